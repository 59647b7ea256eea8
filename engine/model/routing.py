"""The MoE block's control flow around the LLM: routing plans, expert prompts and fusion.

The generative Instruction Router (the base LM with the ``router`` adapter) writes a plan in the format
of :mod:`engine.model.router_plan`; the fixed-template router below builds the same plan from rules and is
both the fallback (untrained or unparseable router output) and the ablation baseline.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.model.config import RSMoEConfig
from engine.model.router_plan import RouterPlan

CAPTION_STYLES = ("concise", "detailed")

# keyword -> expert role, checked in order; the first expert whose keywords match answers
_QUESTION_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("objects", ("how many", "number of", "count", "is there", "are there", "any ", "colour", "color", "size of",
                 "what objects", "which objects")),
    ("relations", ("where", "next to", "beside", "left of", "right of", "between", "near", "around", "arranged",
                   "layout", "surround", "along", "relative", "adjacent", "close to")),
]


@dataclass
class ExpertOutput:
    """What one expert was asked and what it wrote."""

    expert: str
    prompt: str
    text: str


@dataclass
class ModelResult:
    """A caption or an answer with its provenance (router plan and per-expert segments)."""

    text: str
    task: str  # "caption" | "ask"
    style: str | None
    plan: RouterPlan
    router: str  # "generative" | "template"
    segments: list[ExpertOutput] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "task": self.task,
            "style": self.style,
            "router": self.router,
            "scene": self.plan.scene,
            "experts": list(self.plan.experts),
            "segments": [asdict(s) for s in self.segments],
        }


def template_plan(config: RSMoEConfig, task: str, style: str | None = None, question: str | None = None) -> RouterPlan:
    """The fixed-template router: which experts run, with no scene knowledge."""
    names = config.expert_names
    if task == "caption":
        if style == "concise":
            chosen = [n for n in config.router.concise_experts if n in names] or names[:1]
        else:
            chosen = list(names)
        return RouterPlan(scene=None, experts=chosen)
    text = f" {(question or '').lower()} "
    for expert, keywords in _QUESTION_RULES:
        if expert in names and any(k in text for k in keywords):
            return RouterPlan(scene=None, experts=[expert])
    return RouterPlan(scene=None, experts=names[:1])


def sanitize_plan(config: RSMoEConfig, plan: RouterPlan | None, fallback: RouterPlan, task: str, style: str | None) -> RouterPlan:
    """Keep only known experts (in config order for captions); fall back when nothing usable remains.

    A detailed caption always uses every expert (fusion needs all three parts); a concise one and a
    question use the router's choice."""
    if plan is None:
        return fallback
    known = [e for e in plan.experts if e in config.expert_names]
    if task == "caption" and style == "detailed":
        known = list(config.expert_names)
    elif task == "caption":
        known = known[:1] or fallback.experts
    if not known:
        known = fallback.experts
    return RouterPlan(scene=plan.scene, experts=known)


def expert_prompt(config: RSMoEConfig, expert: str, plan: RouterPlan, task: str, instruction: str) -> str:
    """The tailored prompt one expert receives."""
    scene = plan.scene or config.router.unknown_scene
    template = config.expert(expert).prompt if task == "caption" else config.router.answer_prompt
    return template.format(scene=scene, instruction=instruction.strip())


def _first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.!?])(\s|$)", text.strip(), flags=re.S)
    return (match.group(1) if match else text).strip()


def _sentence_case(text: str) -> str:
    text = " ".join(text.split())
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def fuse(outputs: list[ExpertOutput], task: str, style: str | None, order: list[str]) -> str:
    """Join expert outputs: a detailed caption in the fixed expert order, a concise caption as one
    sentence, an answer from the routed expert(s)."""
    ranked = sorted(outputs, key=lambda o: order.index(o.expert) if o.expert in order else len(order))
    texts = [o.text.strip() for o in ranked if o.text.strip()]
    if task == "caption" and style == "concise":
        return _sentence_case(_first_sentence(texts[0])) if texts else ""
    if task == "caption":
        return " ".join(_sentence_case(t) for t in texts)
    return " ".join(texts)
