"""The Instruction Router's plan: a compact, parseable line that the router adapter learns to write.

Format (one line, ``|``-separated fields, lower case)::

    scene: dense residential area | experts: theme, objects, relations

- ``scene``: the scene / land-use type the router recognised, as a short phrase, or ``unknown``.
- ``experts``: the experts that should run, comma-separated, in the order they were chosen.

:func:`format_router_plan` writes it (training targets); :func:`parse_router_plan` reads generated text back
and is tolerant: any case, ``|`` / ``;`` / newline separators, ``expert:`` for ``experts:``, aliases such as
``relationships`` or ``layout`` for ``relations``, and trailing junk after the plan. It returns ``None`` when
no usable plan is found (no ``experts`` field, or no known expert in it), so the caller can fall back to the
fixed-template router.

This module is imported by the engine and by training; it must stay free of torch and of ``training``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

#: The paper's three experts, in the fixed fusion order.
DEFAULT_EXPERTS: tuple[str, ...] = ("theme", "objects", "relations")

#: Words a generated plan may use for the default experts.
EXPERT_ALIASES: dict[str, str] = {
    "theme": "theme",
    "themes": "theme",
    "scene": "theme",
    "scenes": "theme",
    "object": "objects",
    "objects": "objects",
    "relation": "relations",
    "relations": "relations",
    "relationship": "relations",
    "relationships": "relations",
    "layout": "relations",
    "spatial": "relations",
}

#: Scene values that mean "no scene recognised".
UNKNOWN_SCENES: frozenset[str] = frozenset({"", "unknown", "none", "null", "n/a", "na", "-", "?", "unsure"})

_MAX_SCENE_WORDS = 8
_KEY = re.compile(r"\b(scene|experts?)\s*[:=]")
_VALUE_END = re.compile(r"[|;\n]")
_TOKEN_SPLIT = re.compile(r"[,\s/+&]+|\band\b")


@dataclass
class RouterPlan:
    """What the router decided: the recognised scene (``None`` if unknown), the experts to run and, when a
    scene head was asked, its probability for its best scene (whether or not the plan names it)."""

    scene: str | None = None
    experts: list[str] = field(default_factory=list)
    scene_confidence: float | None = None
    resolution_m: float | None = None  # the image's ground resolution as the model sees it (None: unknown)

    def to_text(self) -> str:
        return format_router_plan(self)


def normalize_scene(scene: str | None) -> str | None:
    """Lower-case, single-spaced scene phrase without surrounding punctuation; ``None`` if unknown."""
    if scene is None:
        return None
    text = " ".join(scene.lower().replace("_", " ").split())
    text = text.strip(" .,:;!?\"'`()[]{}<>")
    if text in UNKNOWN_SCENES:
        return None
    words = text.split()
    if len(words) > _MAX_SCENE_WORDS:
        text = " ".join(words[:_MAX_SCENE_WORDS])
    return text or None


def format_router_plan(plan: RouterPlan) -> str:
    """``scene: <phrase|unknown> | experts: a, b, c``."""
    scene = normalize_scene(plan.scene) or "unknown"
    experts = ", ".join(plan.experts) if plan.experts else "none"
    return f"scene: {scene} | experts: {experts}"


def _canonical_expert(token: str, known: Sequence[str] | None) -> str | None:
    token = token.strip(" .,:;!?\"'`()[]{}<>").lower()
    if not token:
        return None
    if known is None:
        return EXPERT_ALIASES.get(token)
    if token in known:
        return token
    alias = EXPERT_ALIASES.get(token)
    return alias if alias in known else None


def parse_router_plan(text: str | None, known_experts: Iterable[str] | None = None) -> RouterPlan | None:
    """Read a plan from generated text; ``None`` when no expert can be recognised.

    ``known_experts``: the expert names of the model (default: theme, objects, relations and their aliases).
    Unknown expert words are ignored; duplicates are dropped, first occurrence kept.
    """
    if not text or not isinstance(text, str):
        return None
    known = list(known_experts) if known_experts is not None else None
    lowered = text.lower()
    keys = list(_KEY.finditer(lowered))
    scene: str | None = None
    experts: list[str] = []
    seen_scene = seen_experts = False
    for i, match in enumerate(keys):
        end = keys[i + 1].start() if i + 1 < len(keys) else len(lowered)
        value = lowered[match.end():end]
        stop = _VALUE_END.search(value)
        if stop:
            value = value[: stop.start()]
        if match.group(1) == "scene" and not seen_scene:
            seen_scene = True
            scene = normalize_scene(value)
        elif match.group(1) != "scene" and not seen_experts:
            seen_experts = True
            for token in _TOKEN_SPLIT.split(value):
                name = _canonical_expert(token, known) if token else None
                if name and name not in experts:
                    experts.append(name)
    if not experts:
        return None
    return RouterPlan(scene=scene, experts=experts)


__all__ = [
    "DEFAULT_EXPERTS",
    "EXPERT_ALIASES",
    "RouterPlan",
    "format_router_plan",
    "normalize_scene",
    "parse_router_plan",
]
