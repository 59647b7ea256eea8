"""UCM-derived VQA: question-answer pairs derived from UCM-captions' class labels and reference captions.

This is NOT a human-annotated VQA set: every answer is computed from the class label or from the five
reference captions of the image, by the rules below. It trains and sanity-checks the answering path; report
figures on it as "UCM-derived VQA", never as VQA accuracy on a benchmark.

Question types (one record per question; ``type`` as in RSVQA where it exists):

``scene``        "What type of scene is this?" -> the class phrase (``dense residential area``).
``rural_urban``  "Is this a rural or an urban area?" -> from :data:`training.data.vocab.UCM_CLASSES`
                 (``setting``): rural = agricultural, beach, chaparral, forest, river; urban = airplane,
                 buildings, dense / medium residential, freeway, harbor, intersection, mobile home park,
                 overpass, parking lot, storage tanks, tennis court. Baseball diamond, golf course, runway
                 and sparse residential are ambiguous at this scale and get no such question.
``presence``     "Is there a <object> in this image?". ``yes`` for objects a caption of the image mentions
                 (not negated: "no car" does not count); ``no`` for objects that are typical of another
                 class (mentioned in at least ``typical_fraction`` of that class's images), mentioned by none
                 of this image's captions, and mentioned by no caption of any image of this image's class
                 (so "tree" is never a negative for residential images, where captions mention trees at
                 times), and not listed as plausible-but-unmentioned for the class
                 (:data:`training.data.vocab.PLAUSIBLE_UNMENTIONED`, e.g. freeway for overpass images).
                 Everyday objects (road, car, house, building, parking lot) are negatives only for
                 natural-land (rural) classes, tree never: captions of built-up scenes often leave them
                 out. Per image, ``k = min(max_presence_per_image, #yes-candidates, #no-candidates)``
                 questions of each answer: yes and no are exactly balanced.
``count``        "How many <objects> are there?" -> a digit, only where at least ``min_count_support``
                 captions quantify the object with a number word ("four storage tanks", "one big and two
                 small airplanes" = 3), all such numbers agree, and no caption contradicts them (a singular
                 "a tank" against "four tanks", or a plural against "one").

Objects come from :data:`training.data.vocab.OBJECT_TERMS` (countable, presence-eligible terms only).
The split of every question is the UCM split of its image. Choices are made with ``random.Random`` seeded
by ``(seed, image_id)``, so the set is deterministic and an image's questions do not depend on the others.
:func:`write_rsvqa_json` writes RSVQA-format JSON that :func:`training.data.loaders.load_rsvqa` reads.
"""
from __future__ import annotations

import json
import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from training.data.records import CaptionRecord, VQARecord
from training.data.subtasks import object_mentions
from training.data.vocab import (
    GENERIC_NEVER_NEGATIVE,
    GENERIC_OBJECTS,
    OBJECT_TERMS,
    PLAUSIBLE_UNMENTIONED,
    UCM_CLASSES,
    class_phrase,
    indefinite,
)

log = logging.getLogger(__name__)

DATASET_NAME = "UCM-derived VQA"
QUESTION_TYPES: tuple[str, ...] = ("scene", "rural_urban", "presence", "count")
SCENE_QUESTION = "What type of scene is this?"
RURAL_URBAN_QUESTION = "Is this a rural or an urban area?"

_TERMS = {t.name: t for t in OBJECT_TERMS}


@dataclass
class DerivedVQAConfig:
    """Knobs of the derivation (defaults produce the documented set)."""

    seed: int = 0
    max_presence_per_image: int = 2
    min_count_support: int = 2
    typical_fraction: float = 0.3


def presence_question(name: str) -> str:
    return f"Is there {indefinite(_TERMS[name].singular)} in this image?"


def count_question(name: str) -> str:
    return f"How many {_TERMS[name].plural} are there?"


def mentioned_objects(captions: Sequence[str], presence_only: bool = True) -> set[str]:
    """Objects any caption mentions without negation."""
    out: set[str] = set()
    for caption in captions:
        for m in object_mentions(caption):
            if not m.negated and (_TERMS[m.name].presence or not presence_only):
                out.add(m.name)
    return out


def agreed_counts(captions: Sequence[str], min_support: int = 2) -> dict[str, int]:
    """Objects whose number the captions agree on (rules in the module docstring)."""
    explicit: dict[str, list[int]] = defaultdict(list)
    singular: set[str] = set()
    plural: set[str] = set()
    for caption in captions:
        counted_here: dict[str, int] = {}
        for m in object_mentions(caption):
            if m.negated or not _TERMS[m.name].countable:
                continue
            if m.count is not None:
                # one number per caption per object (the first); a second different one is a conflict
                if m.name in counted_here and counted_here[m.name] != m.count:
                    explicit[m.name].append(-1)
                counted_here.setdefault(m.name, m.count)
            elif m.singular_article:
                singular.add(m.name)
            elif m.plural:
                plural.add(m.name)
        for name, n in counted_here.items():
            explicit[name].append(n)
    out: dict[str, int] = {}
    for name, numbers in explicit.items():
        if len(numbers) < min_support or len(set(numbers)) != 1 or numbers[0] <= 0:
            continue
        n = numbers[0]
        if (n >= 2 and name in singular) or (n == 1 and name in plural):
            continue
        out[name] = n
    return out


def _class_statistics(records: Sequence[CaptionRecord], typical_fraction: float) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Per class: every object any of its captions mention, and the objects typical of it."""
    per_class_images: Counter[str] = Counter()
    per_class_mentions: dict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        if not r.class_name:
            continue
        per_class_images[r.class_name] += 1
        for name in mentioned_objects(r.captions):
            per_class_mentions[r.class_name][name] += 1
    mentioned = {c: set(m) for c, m in per_class_mentions.items()}
    typical = {
        c: {name for name, n in per_class_mentions[c].items() if n >= typical_fraction * per_class_images[c]}
        for c in per_class_images
    }
    return mentioned, typical


def _may_be_negative(name: str, class_name: str) -> bool:
    """Whether ``name`` may be asked as a presence negative for an image of ``class_name``."""
    if name in PLAUSIBLE_UNMENTIONED.get(class_name, frozenset()):
        return False
    if name in GENERIC_OBJECTS:
        info = UCM_CLASSES.get(class_name)
        return name not in GENERIC_NEVER_NEGATIVE and info is not None and info.setting == "rural"
    return True


def derive_ucm_vqa(records: Sequence[CaptionRecord], config: DerivedVQAConfig | None = None) -> list[VQARecord]:
    """Derive the question set from UCM caption records (all splits at once: class statistics use them all)."""
    config = config or DerivedVQAConfig()
    class_mentioned, typical = _class_statistics(records, config.typical_fraction)
    out: list[VQARecord] = []
    skipped = 0
    for r in sorted(records, key=lambda x: x.image_id):
        if not r.class_name:
            skipped += 1
            continue
        rng = random.Random(f"{config.seed}:{r.image_id}")
        info = UCM_CLASSES.get(r.class_name)
        qa: list[tuple[str, str, str]] = [("scene", SCENE_QUESTION, class_phrase(r.class_name) or r.class_name)]
        if info is not None and info.setting:
            qa.append(("rural_urban", RURAL_URBAN_QUESTION, info.setting))

        present = sorted(mentioned_objects(r.captions))
        absent_pool = set().union(*(t for c, t in typical.items() if c != r.class_name)) if typical else set()
        absent = sorted(
            name for name in absent_pool - class_mentioned.get(r.class_name, set()) - set(present)
            if _may_be_negative(name, r.class_name)
        )
        k = min(config.max_presence_per_image, len(present), len(absent))
        questions = [(name, "yes") for name in rng.sample(present, k)] + [(name, "no") for name in rng.sample(absent, k)]
        questions.sort(key=lambda x: x[0])
        qa.extend(("presence", presence_question(name), answer) for name, answer in questions)

        for name, n in sorted(agreed_counts(r.captions, config.min_count_support).items()):
            qa.append(("count", count_question(name), str(n)))

        for index, (qtype, question, answer) in enumerate(qa):
            out.append(
                VQARecord(
                    image_path=r.image_path,
                    question=question,
                    answer=answer,
                    question_type=qtype,
                    question_id=r.image_id * 100 + index,
                    split=r.split,
                    image=r.filename or r.image_path.name,
                    dataset=DATASET_NAME,
                )
            )
    if skipped:
        log.warning("skipped %d records without a class label", skipped)
    log.info("derived %d %s questions from %d images", len(out), DATASET_NAME, len(records))
    return out


def write_rsvqa_json(records: Sequence[VQARecord], path: str | Path) -> Path:
    """Write RSVQA-format JSON (a list of question records, with ``split`` and ``dataset``); atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = [
        {
            "question": r.question,
            "answer": r.answer,
            "image": r.image or r.image_path.name,
            "question_id": r.question_id,
            "type": r.question_type,
            "split": r.split,
            "dataset": r.dataset or DATASET_NAME,
        }
        for r in records
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def vqa_statistics(records: Sequence[VQARecord]) -> dict[str, dict[str, object]]:
    """Question counts per split and type, and the answer distribution per type."""
    per_split: dict[str, Counter[str]] = defaultdict(Counter)
    answers: dict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        per_split[r.split][r.question_type] += 1
        answers[r.question_type][r.answer] += 1
    return {
        "per_split": {s: dict(sorted(c.items())) for s, c in sorted(per_split.items())},
        "answers": {t: dict(c.most_common()) for t, c in sorted(answers.items())},
        "total": len(records),
    }
