"""Training samples for the two stages: (image, prompt, target, adapter) rows built from the records.

Prompts are made by the engine's own prompt code (:func:`engine.model.routing.expert_prompt` and the
router config), so the model is trained on exactly the prompts it receives at inference:
- stage 1 (dense): one adapter learns the concise-caption prompt -> a whole reference caption (scene
  unknown, as the fixed-template router gives at inference) and derived-VQA questions -> answers;
- stage 2 (MoE): the router learns instruction -> plan (``scene: ... | experts: ...``); each expert
  learns its tailored prompt (with the true scene, as a trained router supplies it) -> its sub-task
  target, the theme expert also the concise caption, and each expert the derived-VQA questions routed to it.
  Optionally a share of the caption rows names a confusable scene instead (the scene head's best wrong
  guess for the image) with the image's true targets, so that an expert learns to follow the image
  when the router's scene is wrong, as it is for about one test image in ten; and a share names no scene
  (the neutral phrase), which the experts get when the scene head is unsure (``vision.scene_min_confidence``).

Every prompt starts with the image's ground resolution where the model is conditioned on it and the image's
resolution is known (``resolutions``: image id -> metres per pixel seen; :func:`engine.model.routing.router_prompt`).

Derived-VQA pairs are drawn evenly across question types (:func:`sample_vqa`): presence questions are
more than half of the pool, and would otherwise leave few scene and count questions in an epoch.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from engine.model.config import ROUTER_ADAPTER, RSMoEConfig
from engine.model.router_plan import RouterPlan
from engine.model.routing import expert_prompt, router_prompt
from training.data.records import CaptionRecord, VQARecord
from training.data.subtasks import experts_for_question, infer_scene, router_target, targets_for_record


@dataclass
class Sample:
    """One teacher-forced row."""

    image_id: int
    prompt: str
    target: str
    adapter: str


def _caption_prompt(config: RSMoEConfig, expert: str, scene: str | None, style: str,
                    resolution: float | None = None) -> str:
    plan = RouterPlan(scene=scene, experts=[expert], resolution_m=resolution)
    instruction = config.router.concise_instruction if style == "concise" else config.router.caption_instruction
    return expert_prompt(config, expert, plan, "caption", instruction, style)


def _answer_prompt(config: RSMoEConfig, expert: str, scene: str | None, question: str,
                   resolution: float | None = None) -> str:
    return expert_prompt(config, expert, RouterPlan(scene=scene, experts=[expert], resolution_m=resolution), "ask",
                         question)


#: Sets whose captions are derived from question-answer facts: their images have no scene class, and the scene
#: words in those captions (``farmland`` in ``A rural area with farmland and forest.``) are not the scene.
SCENELESS_SETS: frozenset[str] = frozenset({"rsvqa_lr", "rsvqa_hr"})


def record_scene(record: CaptionRecord) -> str | None:
    """The scene a trained router names for an image: its class phrase, else the captions' scene words
    (:func:`infer_scene`), none for the images of :data:`SCENELESS_SETS`."""
    if record.dataset in SCENELESS_SETS and not record.class_name:
        return None
    return infer_scene(record.captions, record.class_name)


def sample_vqa(vqa: Sequence[VQARecord], count: int, rng: random.Random) -> list[VQARecord]:
    """``count`` pairs (at most the pool) drawn evenly across question types: a type with fewer pairs than
    its share gives all of them and the others share the rest."""
    by_type: dict[str, list[VQARecord]] = defaultdict(list)
    for q in vqa:
        by_type[q.question_type or ""].append(q)
    types = sorted(by_type, key=lambda t: (len(by_type[t]), t))
    remaining = min(count, len(vqa))
    chosen: list[VQARecord] = []
    for index, question_type in enumerate(types):
        share = remaining // (len(types) - index)
        picked = rng.sample(by_type[question_type], min(share, len(by_type[question_type])))
        chosen += picked
        remaining -= len(picked)
    return chosen


def stage1_samples(config: RSMoEConfig, records: Sequence[CaptionRecord], vqa: Sequence[VQARecord],
                   image_ids: dict[str, int], adapter: str, rng: random.Random, vqa_count: int,
                   resolutions: dict[int, float | None] | None = None) -> list[Sample]:
    """One random reference caption per captioned image, plus ``vqa_count`` VQA pairs (:func:`sample_vqa`)."""
    res = resolutions or {}
    out = [Sample(r.image_id, _caption_prompt(config, adapter, None, "concise", res.get(r.image_id)),
                  rng.choice(r.captions), adapter)
           for r in records if r.captions]
    for q in sample_vqa(vqa, vqa_count, rng):
        image_id = image_ids[str(q.image_path)]
        out.append(Sample(image_id, _answer_prompt(config, adapter, None, q.question, res.get(image_id)), q.answer,
                          adapter))
    rng.shuffle(out)
    return out


def stage2_samples(config: RSMoEConfig, records: Sequence[CaptionRecord], vqa: Sequence[VQARecord],
                   image_ids: dict[str, int], rng: random.Random, vqa_count: int,
                   with_router: bool = True, targets_per_image: int = 3, router_fraction: float = 1.0,
                   concise_per_image: int = 1, confusable_scenes: dict[int, str] | None = None,
                   wrong_scene_fraction: float = 0.0, neutral_scene_fraction: float = 0.0,
                   resolutions: dict[int, float | None] | None = None,
                   neutral_scene_sets: dict[str, float] | None = None) -> list[Sample]:
    """Router plans, expert sub-task targets (``targets_per_image`` experts drawn per image), concise
    captions (``concise_per_image`` distinct references per image) and routed VQA pairs; a random
    ``router_fraction`` of the images and questions also gives the router a plan row (its plans are short
    and quickly learnt; the rest of the steps go to the experts). A random ``wrong_scene_fraction`` of the
    caption rows of images in ``confusable_scenes`` names that scene in the prompt instead of the true one, and
    a random ``neutral_scene_fraction`` of the caption rows names no scene (``neutral_scene_sets``: another
    share for a set's rows, as for sets on which the scene head is mostly unsure at inference)."""
    experts = config.expert_names
    res = resolutions or {}
    records = [r for r in records if r.captions]
    scenes = {r.image_id: record_scene(r) for r in records}
    confusable_scenes = confusable_scenes or {}

    neutral_shares = neutral_scene_sets or {}

    def caption_scene(record: CaptionRecord) -> str | None:
        neutral = neutral_shares.get(record.dataset, neutral_scene_fraction)
        if neutral > 0 and rng.random() < neutral:
            return None
        image_id = record.image_id
        if wrong_scene_fraction > 0 and image_id in confusable_scenes and rng.random() < wrong_scene_fraction:
            return confusable_scenes[image_id]
        return scenes[image_id]

    out: list[Sample] = []
    for r in records:
        scene = scenes[r.image_id]
        targets = targets_for_record(r).as_dict()
        for expert in rng.sample(experts, min(targets_per_image, len(experts))):
            if expert in targets:
                prompt = _caption_prompt(config, expert, caption_scene(r), "detailed", res.get(r.image_id))
                out.append(Sample(r.image_id, prompt, targets[expert], expert))
        concise_expert = next((e for e in config.router.concise_experts if e in experts), experts[0])
        for caption in rng.sample(r.captions, min(concise_per_image, len(r.captions))):
            prompt = _caption_prompt(config, concise_expert, caption_scene(r), "concise",
                                     res.get(r.image_id))
            out.append(Sample(r.image_id, prompt, caption, concise_expert))
        if with_router and rng.random() < router_fraction:
            instruction = rng.choice([config.router.caption_instruction, config.router.concise_instruction])
            out.append(Sample(r.image_id, router_prompt(config, instruction, res.get(r.image_id)),
                              router_target(scene, experts=experts), ROUTER_ADAPTER))
    by_image = {r.image_id: r for r in records}
    for q in sample_vqa(vqa, vqa_count, rng):
        image_id = image_ids[str(q.image_path)]
        if image_id not in by_image:
            continue
        scene = scenes[image_id]
        chosen = [e for e in experts_for_question(q.question, q.question_type) if e in experts] or experts[:1]
        out.append(Sample(image_id, _answer_prompt(config, chosen[0], scene, q.question, res.get(image_id)), q.answer,
                          chosen[0]))
        if with_router and rng.random() < router_fraction:
            out.append(Sample(image_id, router_prompt(config, q.question, res.get(image_id)),
                              router_target(scene, q.question, q.question_type, experts=experts), ROUTER_ADAPTER))
    rng.shuffle(out)
    return out
