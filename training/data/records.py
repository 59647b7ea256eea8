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
    ``captions``: the reference sentences as written (whitespace collapsed, nothing else changed); empty for
    a class-labelled set without sentences (EuroSAT).
    ``ground_resolution_m`` / ``width``: the image's native ground sample distance and width, where known, from
    which :func:`seen_resolution` gives the metres per pixel of what the model sees.
    ``parts``: for an image made of patches of several classes (EuroSAT mosaics), each patch's class; its
    ``class_name`` is then the main one.
    """

    image_id: int
    image_path: Path
    split: str
    class_name: str | None
    captions: list[str]
    dataset: str = ""
    filename: str = ""
    ground_resolution_m: float | None = None  # native metres per pixel of the image file (None: unknown)
    width: int | None = None  # the image file's width in pixels, when the dataset says it
    parts: list[str] = field(default_factory=list)  # a composite image's class of each part (a mosaic's cells)


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
    ground_resolution_m: float | None = None  # native metres per pixel of the image (None: unknown)
    width: int | None = None


def seen_resolution(native_m: float | None, width: int | None, input_size: int) -> float | None:
    """Metres per pixel of what the model sees: the native ground sample distance of an image ``width``
    pixels wide, resampled to ``input_size`` pixels (None when either is unknown)."""
    if native_m is None or not width:
        return None
    return native_m * width / input_size
