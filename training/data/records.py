"""Typed records that every loader returns: one per image (captions) or per question (VQA)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def evenly_spaced(items: Sequence[T], count: int | None) -> list[T]:
    """``count`` items spread evenly over ``items`` (all of them when ``count`` is None or larger).

    Splits are ordered by class (UCM: 10 val images per class in a row), so the first N would cover a few
    classes only; every k-th item covers all of them."""
    if not count or count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


@dataclass
class CaptionRecord:
    """One image with its reference captions.

    ``image_id``: the dataset's image id (Karpathy ``imgid``; the list index for RSICap).
    ``split``: as written in the file (``train`` / ``val`` / ``test``; RSICap has none and gets the loader's).
    ``class_name``: the land-use class when the file has one (UCM ``class``), else ``None``.
    ``captions``: the reference sentences as written (whitespace collapsed, nothing else changed).
    """

    image_id: int
    image_path: Path
    split: str
    class_name: str | None
    captions: list[str]
    dataset: str = ""
    filename: str = ""


@dataclass
class VQARecord:
    """One question about one image (RSVQA record layout).

    ``question_type``: the file's ``type`` (RSVQA: presence, comp, count, rural_urban; UCM-derived: scene,
    presence, count, rural_urban). ``image``: the image name as written in the file.
    """

    image_path: Path
    question: str
    answer: str
    question_type: str
    question_id: int | str
    split: str
    image: str = ""
    dataset: str = ""
    extra: dict[str, object] = field(default_factory=dict)
