"""The MoE block's control flow around the LLM: routing plans, expert prompts and fusion.

The generative Instruction Router (the base LM with the ``router`` adapter) writes a plan in the format
of :mod:`engine.model.router_plan`; the fixed-template router below builds the same plan from rules and is
both the fallback (untrained or unparseable router output) and the ablation baseline.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from engine.errors import UserInputError
from engine.model.answer_head import AnswerHead, HeadAnswer, head_features, question_kind, region_inputs
from engine.model.config import ROUTER_ADAPTER, RSMoEConfig
from engine.model.image_processing import ImageProcessor, dihedral
from engine.model.router_plan import RouterPlan, parse_router_plan

log = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 1000

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


def round_resolution(resolution_m: float | None) -> float | None:
    """A ground resolution as results report it: 3 significant figures (None stays None)."""
    return None if resolution_m is None else float(f"{resolution_m:.3g}")


def uncertainty_reasons(config: RSMoEConfig, plan: RouterPlan, answer_confidence: float | None = None) -> list[str]:
    """Why a result may be wrong, in short phrases (empty: nothing known against it).

    ``"scene unsure (0.41)"`` where the scene head's probability is below ``vision.scene_min_confidence``;
    ``"resolution 0.05 m/px is finer than the trained range 0.3-12 m/px"`` where the seen ground resolution
    lies more than 1.5x outside ``resolution.min_m`` .. ``resolution.max_m``; ``"answer unsure (0.52)"`` where
    the answer head's probability is below ``answer_head.min_confidence``."""
    reasons = []
    if answer_confidence is not None and answer_confidence < config.answer_head.min_confidence:
        reasons.append(f"answer unsure ({answer_confidence:.2f})")
    confidence = plan.scene_confidence
    if confidence is not None and confidence < config.vision.scene_min_confidence:
        reasons.append(f"scene unsure ({confidence:.2f})")
    res = config.resolution
    side = res.outside(plan.resolution_m)
    if side is not None:
        low = "?" if res.min_m is None else f"{res.min_m:g}"
        high = "?" if res.max_m is None else f"{res.max_m:g}"
        reasons.append(f"resolution {round_resolution(plan.resolution_m):g} m/px is {side} than the trained range "
                       f"{low}-{high} m/px")
    return reasons


@dataclass
class ModelResult:
    """A caption or an answer with its provenance (router plan and per-expert segments).

    ``uncertainty`` lists why the result may be wrong (:func:`uncertainty_reasons`, filled by :meth:`assess`,
    which :meth:`MoEInference.run_experts` calls for every result);
    ``uncertain`` is true when it is not empty."""

    text: str
    task: str  # "caption" | "ask"
    style: str | None
    plan: RouterPlan
    router: str  # "generative" | "template" | "answer_head" (a closed answer from the answer head)
    segments: list[ExpertOutput] = field(default_factory=list)
    uncertainty: list[str] = field(default_factory=list)
    answer_confidence: float | None = None  # the answer head's probability (answers it gave only)

    @property
    def scene_confidence(self) -> float | None:
        """The scene head's probability for its best scene, to 4 places (``None`` without a head)."""
        confidence = self.plan.scene_confidence
        return None if confidence is None else round(confidence, 4)

    @property
    def uncertain(self) -> bool:
        return bool(self.uncertainty)

    @property
    def model_resolution_m(self) -> float | None:
        """The ground resolution the model saw (metres per input pixel), to 3 significant figures."""
        return round_resolution(self.plan.resolution_m)

    def assess(self, config: RSMoEConfig) -> ModelResult:
        """Fill :attr:`uncertainty` from the model's config (scene threshold, trained resolution range)."""
        self.uncertainty = uncertainty_reasons(config, self.plan, self.answer_confidence)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "task": self.task,
            "style": self.style,
            "router": self.router,
            "scene": self.plan.scene,
            "scene_confidence": self.scene_confidence,
            "experts": list(self.plan.experts),
            "segments": [asdict(s) for s in self.segments],
            "model_resolution_m": self.model_resolution_m,
            "uncertain": self.uncertain,
            "uncertainty": list(self.uncertainty),
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
    # a plan parsed from the router's text knows no resolution: the request's (the fallback's) stays
    resolution_m = plan.resolution_m if plan.resolution_m is not None else fallback.resolution_m
    return RouterPlan(scene=plan.scene, experts=known, resolution_m=resolution_m)


def expert_prompt(config: RSMoEConfig, expert: str, plan: RouterPlan, task: str, instruction: str,
                  style: str | None = None) -> str:
    """The tailored prompt one expert receives (the recognised scene filled in, after the ground resolution
    where the model is conditioned on it and the plan knows it)."""
    scene = plan.scene or config.router.unknown_scene
    if task != "caption":
        template = config.router.answer_prompt
    elif style == "concise":
        template = config.router.concise_prompt
    else:
        template = config.expert(expert).prompt
    return config.resolution.phrase(plan.resolution_m) + template.format(scene=scene, instruction=instruction.strip())


def router_prompt(config: RSMoEConfig, instruction: str, resolution_m: float | None = None) -> str:
    """The Instruction Router's prompt for an instruction (after the ground resolution, as for the experts)."""
    return config.resolution.phrase(resolution_m) + config.router.prompt.format(instruction=instruction)


def _first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.!?])(\s|$)", text.strip(), flags=re.S)
    return (match.group(1) if match else text).strip()


def _sentence_case(text: str) -> str:
    text = " ".join(text.split())
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


#: A detailed caption drops an expert's sentence that shares at least this share of its words (Jaccard) with a
#: sentence already kept: "This is a rural area with farmland." after "This is a rural area of farmland." (0.75),
#: or whose words a kept sentence all holds (it says nothing new: the same after "This is a rural area of
#: farmland with a forest and a river.").
NEAR_DUPLICATE_OVERLAP = 0.7


def fuse(outputs: list[ExpertOutput], task: str, style: str | None, order: list[str]) -> str:
    """Join expert outputs: a detailed caption in the fixed expert order, each sentence once (near-duplicates
    dropped: :data:`NEAR_DUPLICATE_OVERLAP`), a concise caption as one sentence, an answer from the routed
    expert(s)."""
    ranked = sorted(outputs, key=lambda o: order.index(o.expert) if o.expert in order else len(order))
    texts = [o.text.strip() for o in ranked if o.text.strip()]
    if task == "caption" and style == "concise":
        return _sentence_case(_first_sentence(texts[0])) if texts else ""
    if task == "caption":
        kept: list[tuple[set[str], str]] = []  # first expert first
        for text in texts:
            words = _words(text)
            if not any(words <= other or _overlap(words, other) >= NEAR_DUPLICATE_OVERLAP for other, _ in kept):
                kept.append((words, _sentence_case(text)))
        return " ".join(sentence for _, sentence in kept)
    return " ".join(texts)


def _words(text: str) -> set[str]:
    """A sentence's lower-case words, punctuation dropped (two experts' identical sentences compare equal)."""
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _overlap(a: set[str], b: set[str]) -> float:
    """The share of words two sentences have in common (Jaccard; 1.0 for two empty ones)."""
    return len(a & b) / len(a | b) if a | b else 1.0


class MoEInference:
    """The MoE block's inference flow, shared by every backend (torch, ONNX Runtime).

    A backend provides ``config``, ``trained_adapters``, ``image_processor`` and three primitives:
    ``encode_images(pixels) -> visual tokens``, ``generate_texts(visual, prompts, adapters, max_new_tokens,
    num_beams)`` (one mixed-adapter batch) and ``preprocess(images) -> pixels``, plus ``scene_logits(visual)``
    when the model has a scene head. Everything else lives here once.

    With a trained router the plan's experts come from the router; its scene comes from the scene head when
    the model has one (the router adapter's own scene otherwise), averaged over ``config.vision.scene_views``
    dihedral views of the image where the pixels are at hand (:meth:`view_scene_logits`). The template router
    (no trained router, e.g. the dense stage-1 baseline) knows no scene.
    """

    config: RSMoEConfig
    trained_adapters: set[str]
    image_processor: ImageProcessor
    tokenizer: Any  # the LM tokenizer (with a pad token: see ensure_pad_token)
    qformer_tokenizer: Any
    answer_head: AnswerHead | None = None  # closed answers (engine.model.answer_head); None: experts answer all

    def describe(self) -> dict[str, Any]:  # pragma: no cover - interface
        """What runs the model: ``backend``, ``providers``, ``device``, ``precision`` (health endpoint)."""
        raise NotImplementedError

    def preprocess(self, images: Sequence[Any]) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def encode_images(self, pixel_values: Any) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def generate_texts(self, visual: Any, prompts: Sequence[str], adapters: Sequence[str],
                       max_new_tokens: int, num_beams: int = 1) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def scene_logits(self, visual: Any) -> Any | None:
        """The scene head's logits (B, len(config.vision.scene_classes)); ``None`` for a model without one."""
        return None

    def view_scene_logits(self, pixels: Any, visual: Any) -> Any | None:
        """The scene head's logits averaged over ``config.vision.scene_views`` dihedral views of ``pixels``
        (B, scenes) for the images whose single-view probability is below ``vision.scene_views_below`` (the
        others keep their single-view logits); ``visual`` holds view 0's tokens, already encoded. ``None``
        without a scene head.

        The head is linear over the mean token, so the mean over all views' tokens gives the mean logits."""
        if not self.config.vision.scene_classes:
            return None
        single = self.scene_logits(visual)
        views = self.config.vision.scene_views
        if views <= 1:
            return single
        below = self.config.vision.scene_views_below
        unsure = [i for i, p in enumerate(softmax_rows(single).max(axis=-1)) if below >= 1.0 or p < below]
        if not unsure:
            return single
        doubtful = pixels[unsure]  # one encoder pass per view, so memory stays that of one batch
        tokens = [visual[unsure]] + [self.encode_images(dihedral(doubtful, v, axes=(2, 3))) for v in range(1, views)]
        averaged = self.scene_logits(concat_rows(tokens, axis=1))
        rows = [single[i:i + 1] for i in range(len(single))]
        for j, i in enumerate(unsure):
            rows[i] = averaged[j:j + 1]
        return concat_rows(rows)

    def scene_guesses(self, visual: Any, scene_logits: Any | None = None,
                      resolutions: Sequence[float | None] | None = None) -> list[SceneGuess] | None:
        """The scene head's best scene for each image and its probability, from ``scene_logits``
        (:meth:`view_scene_logits`), or from the head on ``visual`` when not given; ``None`` without a head.
        With ``resolutions`` (each image's seen ground resolution), classes the model learnt only at far other
        resolutions (:meth:`ResolutionConfig.scene_plausible`) are left out and the rest renormalised."""
        logits = scene_logits if scene_logits is not None else self.scene_logits(visual)
        if logits is None:
            return None
        probabilities = softmax_rows(logits)
        scenes = self.config.vision.scene_classes
        if resolutions is not None and self.config.resolution.scene_m:
            plausible = np.array([[self.config.resolution.scene_plausible(s, r) for s in scenes]
                                  for r in resolutions])
            kept = probabilities * plausible
            total = kept.sum(-1, keepdims=True)
            probabilities = np.where(total > 0, kept / np.where(total > 0, total, 1.0), probabilities)
        best = probabilities.argmax(-1)
        return [SceneGuess(scenes[int(i)], float(row[i])) for i, row in zip(best, probabilities)]

    def recognise_scenes(self, visual: Any, scene_logits: Any | None = None) -> list[str] | None:
        """The scene head's best scene for each image (:meth:`scene_guesses`); ``None`` without a head."""
        guesses = self.scene_guesses(visual, scene_logits)
        return None if guesses is None else [g.scene for g in guesses]

    # -- text in and out of the models: one implementation for every backend ---------------------------
    def format_prompt(self, prompt: str) -> str:
        """The text that follows the visual prefix (chat-formatted where the tokenizer has a template)."""
        if self.config.llm.use_chat_template and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      tokenize=False, add_generation_prompt=True)
        return f"{prompt}\n"

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the formatted prompt (no special tokens added)."""
        return self.tokenizer(self.format_prompt(prompt), add_special_tokens=False)["input_ids"]

    def tokenize_instructions(self, instructions: Sequence[str], return_tensors: str = "pt",
                              pad_to_max: bool = False) -> Any:
        """Q-Former tokenizer output (``input_ids``, ``attention_mask``) for the instruction texts, padded to
        the longest (or, for fixed-shape graphs, to ``qformer.max_instruction_tokens``)."""
        return self.qformer_tokenizer(list(instructions), padding="max_length" if pad_to_max else True,
                                      truncation=True, max_length=self.config.qformer.max_instruction_tokens,
                                      return_tensors=return_tensors)

    def decode_texts(self, token_rows: Any) -> list[str]:
        """Generated token ids (rows) -> stripped texts, special tokens dropped."""
        return [t.strip() for t in self.tokenizer.batch_decode(token_rows, skip_special_tokens=True)]

    @property
    def router_kind(self) -> str:
        """``generative`` when a trained router adapter is present, else ``template``."""
        if self.config.router.type == "generative" and ROUTER_ADAPTER in self.trained_adapters:
            return "generative"
        return "template"

    def route(self, visual: Any, task: str, style: str | None, instructions: Sequence[str],
              scene_logits: Any | None = None,
              resolutions: Sequence[float | None] | None = None) -> tuple[list[RouterPlan], str]:
        """One routing plan per image (generative router, with the template router as fallback); a concise
        caption's plan names the scene head's scene only at ``vision.scene_min_confidence`` or above. Each
        plan carries its image's ground resolution (``resolutions``, metres per pixel seen; None: unknown)."""
        resolutions = list(resolutions) if resolutions is not None else [None] * len(instructions)
        fallbacks = [replace(template_plan(self.config, task, style, q if task == "ask" else None), resolution_m=r)
                     for q, r in zip(instructions, resolutions)]
        if self.router_kind != "generative":
            return fallbacks, "template"
        guesses = self.scene_guesses(visual, scene_logits, resolutions)
        if task == "caption" and guesses is not None:
            # a caption's plan is fixed but for its scene: the router learns "every expert" for any caption
            # instruction (a concise caption then takes the first), and the scene head names the scene, so the
            # plan needs no decoding (about half a caption's decoding time saved)
            texts: list[str | None] = [None] * len(fallbacks)
        else:
            prompts = [router_prompt(self.config, q, r) for q, r in zip(instructions, resolutions)]
            texts = list(self.generate_texts(visual, prompts, [ROUTER_ADAPTER] * len(prompts),
                                             self.config.router.max_new_tokens))
        guesses = guesses or [None] * len(texts)
        gated = task == "caption" and style == "concise"
        threshold = self.config.vision.scene_min_confidence if gated else 0.0
        plans = []
        for text, fallback, guess in zip(texts, fallbacks, guesses):
            parsed = None if text is None else parse_router_plan(text, self.config.expert_names)
            if parsed is None and text is not None:
                log.debug("router output %r not a plan; using the template plan", text)
            plan = sanitize_plan(self.config, parsed, fallback, task, style)
            if guess is not None:  # the scene head names the scene (measured more accurate than the LM's)
                scene = guess.scene if guess.confidence >= threshold else None
                plan = RouterPlan(scene=scene, experts=plan.experts, scene_confidence=guess.confidence,
                                  resolution_m=plan.resolution_m)
            plans.append(plan)
        return plans, "generative"

    def run_experts(self, visual: Any, task: str, style: str | None, instructions: Sequence[str],
                    scene_logits: Any | None = None,
                    resolutions: Sequence[float | None] | None = None) -> list[ModelResult]:
        """Route, then decode every (image, expert) pair in one mixed-adapter batch, then fuse."""
        plans, router = self.route(visual, task, style, instructions, scene_logits, resolutions)
        rows: list[tuple[int, str, str]] = []
        for i, plan in enumerate(plans):
            for expert in plan.experts:
                rows.append((i, expert, expert_prompt(self.config, expert, plan, task, instructions[i], style)))
        generation = self.config.generation
        max_new = generation.max_new_tokens if task == "caption" else generation.max_new_tokens_answer
        # concise captions by beam search where the config asks; detailed captions greedily (with beams the
        # experts fall back on the same surest sentence), answers and plans greedily
        beams = generation.num_beams if task == "caption" and style == "concise" else 1
        texts = self.generate_texts(visual[[r[0] for r in rows]], [r[2] for r in rows], [r[1] for r in rows],
                                    max_new, beams)
        results = []
        for i, plan in enumerate(plans):
            segments = [ExpertOutput(r[1], r[2], t) for r, t in zip(rows, texts) if r[0] == i]
            text = fuse(segments, task, style, self.config.expert_names)
            results.append(ModelResult(text, task, style, plan, router, segments).assess(self.config))
        return results

    def caption_features(self, visual: Any, style: str = "detailed", scene_logits: Any | None = None,
                         resolutions: Sequence[float | None] | None = None) -> list[ModelResult]:
        """Captions for already-encoded images (B, N, D); ``scene_logits`` from :meth:`view_scene_logits`
        (default: the scene head on ``visual`` alone); ``resolutions``: each image's ground resolution in
        metres per pixel of the model input (None where unknown)."""
        instructions = self._caption_instructions(style, visual.shape[0])
        return self.run_experts(visual, "caption", style, instructions, scene_logits, resolutions)

    def caption_plans(self, visual: Any, style: str = "concise", scene_logits: Any | None = None,
                      resolutions: Sequence[float | None] | None = None) -> tuple[list[RouterPlan], str]:
        """The routing plans (and router kind) :meth:`caption_features` would decode for these images, without
        decoding any caption: what a region captioned from its tiles keeps of itself (scene, resolution)."""
        return self.route(visual, "caption", style, self._caption_instructions(style, visual.shape[0]),
                          scene_logits, resolutions)

    def _caption_instructions(self, style: str, count: int) -> list[str]:
        """The caption instruction of ``style`` for ``count`` images."""
        if style not in CAPTION_STYLES:
            raise UserInputError(f"unknown caption style {style!r}; use one of {', '.join(CAPTION_STYLES)}")
        router = self.config.router
        return [router.concise_instruction if style == "concise" else router.caption_instruction] * count

    def ask_features(self, visual: Any, questions: Sequence[str], scene_logits: Any | None = None,
                     resolutions: Sequence[float | None] | None = None,
                     region_probabilities: np.ndarray | None = None) -> list[ModelResult]:
        """Answers for already-encoded images, one question per image (``scene_logits`` and ``resolutions``
        as for :meth:`caption_features`): closed questions the answer head knows are answered by it in one
        pass (:meth:`head_answers`; ``region_probabilities`` as there), every other question by the router
        and the experts."""
        for q in questions:
            if not q or not q.strip():
                raise UserInputError("the question is empty")
            if len(q) > MAX_QUESTION_CHARS:
                raise UserInputError(f"the question has {len(q)} characters; the limit is {MAX_QUESTION_CHARS}")
        questions = list(questions)
        kinds = [self.closed_kind(q) for q in questions]
        closed = [i for i, kind in enumerate(kinds) if kind is not None]
        opened = [i for i, kind in enumerate(kinds) if kind is None]
        results: list[ModelResult | None] = [None] * len(questions)
        if closed:
            answers = self.head_answers(visual[closed], [questions[i] for i in closed], [kinds[i] for i in closed],
                                        None if region_probabilities is None else region_probabilities[closed])
            guesses = self.scene_guesses(visual[closed], None if scene_logits is None else scene_logits[closed],
                                         None if resolutions is None else [resolutions[i] for i in closed])
            for j, (i, answer) in enumerate(zip(closed, answers)):
                results[i] = self.head_result(answer, guesses[j] if guesses is not None else None,
                                              resolutions[i] if resolutions is not None else None)
        if opened:
            answered = self.run_experts(visual[opened], "ask", None, [questions[i] for i in opened],
                                        None if scene_logits is None else scene_logits[opened],
                                        None if resolutions is None else [resolutions[i] for i in opened])
            for i, result in zip(opened, answered):
                results[i] = result
        return [r for r in results if r is not None]

    def closed_kind(self, question: str) -> str | None:
        """The closed kind of a question the answer head answers (:func:`question_kind`), or None where the
        experts answer it: an open question, a word the head never learnt, or a model without a head."""
        if self.answer_head is None or not self.answer_head.knows(question):
            return None
        return question_kind(question)

    def head_result(self, answer: HeadAnswer, guess: SceneGuess | None, resolution: float | None) -> ModelResult:
        """An answer head's answer as a result (the scene head's guess and the seen resolution in its plan)."""
        plan = RouterPlan(scene=guess.scene if guess else None, experts=[], resolution_m=resolution,
                          scene_confidence=guess.confidence if guess else None)
        return ModelResult(_sentence_case(answer.text), "ask", None, plan, "answer_head",
                           answer_confidence=answer.confidence).assess(self.config)

    def answer_head_inputs(self, visual: Any, questions: Sequence[str],
                           region_probabilities: np.ndarray | None = None, own_region: bool = False) -> np.ndarray:
        """What the answer head sees of each (image, question) but the question's words: the Q-Former's
        query mean for the question, the mean visual token, the scene head's probabilities where the model
        has a scene head, and :func:`region_inputs` of ``region_probabilities`` where given (of the image's own
        scene probabilities where not given and ``own_region``) (B, Q + D [+ S] [+ S])."""
        parts = [_numpy(self.query_embeddings(visual, questions)).mean(axis=1), _numpy(visual).mean(axis=1)]
        scenes = self.scene_logits(visual)
        own = None if scenes is None else softmax_rows(_numpy(scenes))
        if own is not None:
            parts.append(own)
        if region_probabilities is None and own_region:
            region_probabilities = own
        if region_probabilities is not None:
            parts.append(region_inputs(region_probabilities))
        return np.concatenate(parts, axis=1)

    def head_answers(self, visual: Any, questions: Sequence[str], kinds: Sequence[str],
                     region_probabilities: np.ndarray | None = None) -> list[HeadAnswer]:
        """The answer head's answers to closed questions (one per encoded image). A head with
        ``region_inputs`` sees ``region_probabilities`` (B, S: each image's region's scene probabilities
        averaged over its tiles), or each image's own where not given (a region of about one tile)."""
        assert self.answer_head is not None
        with_region = self.answer_head.region_inputs
        inputs = self.answer_head_inputs(visual, questions, region_probabilities if with_region else None,
                                         own_region=with_region)
        return self.answer_head.answer(head_features(self.answer_head.words(questions), inputs), kinds)

    def region_probabilities(self, visual: Any, regions: Sequence[np.ndarray | None]) -> np.ndarray:
        """(B, S) for :meth:`head_answers`: each image's region's tile-mean scene probabilities (``regions``:
        :meth:`engine.pipeline.Pipeline.region_mean_probabilities`), or the image's own where None."""
        own = softmax_rows(self.scene_logits(visual))
        return np.stack([own[i] if r is None else np.asarray(r, dtype=np.float64) for i, r in enumerate(regions)])

    def encode(self, images: Sequence[Any]) -> tuple[Any, Any | None]:
        """Images (arrays, PIL images or paths) -> visual tokens (B, N, D) and the scene logits of
        :meth:`view_scene_logits` (``None`` without a scene head, or with the template router, whose plans
        name no scene: no views are encoded for it)."""
        pixels = self.preprocess(images)
        visual = self.encode_images(pixels)
        if self.router_kind != "generative":
            return visual, None
        return visual, self.view_scene_logits(pixels, visual)

    def caption(self, images: Sequence[Any], style: str = "detailed",
                resolutions: Sequence[float | None] | None = None) -> list[ModelResult]:
        """Caption a batch of images (arrays, PIL images or paths)."""
        visual, scene_logits = self.encode(images)
        return self.caption_features(visual, style, scene_logits, resolutions)

    def ask(self, images: Sequence[Any], question: str,
            resolutions: Sequence[float | None] | None = None) -> list[ModelResult]:
        """Ask the same question about each image."""
        visual, scene_logits = self.encode(images)
        return self.ask_features(visual, [question] * len(images), scene_logits, resolutions)


@dataclass
class SceneGuess:
    """The scene head's best scene for an image and its softmax probability."""

    scene: str
    confidence: float


def softmax_rows(logits: Any) -> Any:
    """Row-wise softmax of torch or NumPy logits (B, classes), as a float64 NumPy array."""
    import numpy as np

    values = np.asarray(logits.detach().float().cpu() if hasattr(logits, "detach") else logits, dtype=np.float64)
    values = np.exp(values - values.max(axis=-1, keepdims=True))
    return values / values.sum(axis=-1, keepdims=True)


def _numpy(x: Any) -> np.ndarray:
    """A torch tensor (detached, float32) or an array as a NumPy array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def concat_rows(parts: Sequence[Any], axis: int = 0) -> Any:
    """Concatenate torch tensors or NumPy arrays (every backend's batches) along ``axis``."""
    if hasattr(parts[0], "detach"):  # torch
        import torch

        return torch.cat(list(parts), dim=axis)
    import numpy as np

    return np.concatenate(list(parts), axis=axis)


def ensure_pad_token(tokenizer: Any) -> Any:
    """Left-padded batches need a pad token; LMs without one pad with EOS."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
