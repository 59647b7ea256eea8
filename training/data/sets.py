"""The training mixture: every configured set loaded, given image ids unique across sets, and its scene labels.

Sets: UCM-captions (0.3 m aerials, human captions), AID with RSICD's human captions (Google Earth, 2-32 m),
EuroSAT (Sentinel-2, 10 m, class labels only), RSVQA-LR (Sentinel-2) and RSVQA-HR (15 cm orthophotos), the
last two as questions, and mosaics of EuroSAT patches (:mod:`training.data.mosaics`) where the recipe asks.
Image ids are offset per set (``SET_ID_OFFSETS``) so one feature store holds them all.
The scene classes are the union of the class-labelled sets' classes, by readable phrase
(:func:`training.data.vocab.class_phrase`): classes of the same phrase in two sets (``forest``, ``river``,
``airport``, ``dense residential area`` ...) are one scene.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

from engine.errors import UserInputError
from training.data.loaders import load_class_folder, load_rsvqa_split, load_ucm_captions
from training.data.mosaics import load_mosaics
from training.data.records import CaptionRecord, VQARecord, evenly_spaced
from training.data.vocab import class_phrase

log = logging.getLogger(__name__)

#: Image-id offset of each set in the mixture (every set has fewer than a million images).
SET_ID_OFFSETS: dict[str, int] = {"ucm": 0, "aid": 1_000_000, "eurosat": 2_000_000, "rsvqa_lr": 3_000_000,
                                  "rsvqa_hr": 4_000_000, "eurosat_mosaic": 5_000_000}
CAPTION_SETS: tuple[str, ...] = ("ucm", "aid", "eurosat", "eurosat_mosaic")
VQA_SETS: tuple[str, ...] = ("rsvqa_lr", "rsvqa_hr")


@dataclass
class SetMixture:
    """Records of one split from every configured set (ids unique across sets)."""

    captions: list[CaptionRecord] = field(default_factory=list)  # image records (class-labelled and/or captioned)
    questions: list[VQARecord] = field(default_factory=list)  # RSVQA questions

    def by_set(self) -> dict[str, list[CaptionRecord]]:
        out: dict[str, list[CaptionRecord]] = {}
        for r in self.captions:
            out.setdefault(r.dataset, []).append(r)
        return out


def load_set(name: str, root: str | Path, split: str) -> list[CaptionRecord] | list[VQARecord]:
    """One set's records of ``split`` (caption/class records, or RSVQA questions), ids not yet offset."""
    if name == "ucm":
        return [replace(r, dataset="ucm") for r in load_ucm_captions(root, split=split)]
    if name in ("aid", "eurosat"):
        return [replace(r, dataset=name) for r in load_class_folder(root, split=split)]
    if name in VQA_SETS:
        return load_rsvqa_split(root, split, dataset=name)
    if name == "eurosat_mosaic":
        return load_mosaics(root, split)
    raise UserInputError(f"unknown data set {name!r} (known: {', '.join(SET_ID_OFFSETS)})")


def load_mixture(roots: dict[str, str | None], split: str, limits: dict[str, int] | None = None) -> SetMixture:
    """Every set of ``roots`` that has a folder, split ``split``; ``limits`` caps a set's images (evenly spaced,
    so every class keeps its share)."""
    limits = limits or {}
    unknown = set(roots) - set(SET_ID_OFFSETS)
    if unknown:
        raise UserInputError(f"unknown data sets {sorted(unknown)} (known: {', '.join(SET_ID_OFFSETS)})")
    mixture = SetMixture()
    for name, root in roots.items():
        if not root:
            continue
        offset = SET_ID_OFFSETS[name]
        records = load_set(name, root, split)
        if name in VQA_SETS:
            images = sorted({q.image for q in records})
            keep = set(evenly_spaced(images, limits.get(name)))
            mixture.questions += [replace(q, extra={**q.extra, "image_id": offset + int(Path(q.image).stem)})
                                  for q in records if q.image in keep]
        else:
            chosen = evenly_spaced(records, limits.get(name))
            mixture.captions += [replace(r, image_id=offset + r.image_id) for r in chosen]
        log.info("%s %s: %d records", name, split, len(records))
    return mixture


def scene_vocabulary(records: Iterable[CaptionRecord]) -> list[str]:
    """The union of the records' scene phrases, sorted (the scene head's classes)."""
    return sorted({p for p in (class_phrase(r.class_name) for r in records) if p})


def scene_index(records: Sequence[CaptionRecord], phrases: Sequence[str]) -> list[int]:
    """Each record's class as an index into ``phrases`` (every record needs a class among them)."""
    index = {p: i for i, p in enumerate(phrases)}
    missing = sorted({str(r.class_name) for r in records if class_phrase(r.class_name) not in index})
    if missing:
        raise UserInputError(f"scene classes without a phrase in the vocabulary: {missing[:5]}")
    return [index[str(class_phrase(r.class_name))] for r in records]
