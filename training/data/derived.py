"""Derived reference captions for sets without human ones (EuroSAT, RSVQA tiles). Always called "derived".

- **EuroSAT** (class labels only): three fixed sentences per class (:data:`EUROSAT_CAPTIONS`), each true of every
  image of the class at 10 m (what a Sentinel-2 64 px patch shows), written in the plain style of the human
  caption sets.
- **RSVQA tiles** (question-answer pairs from OpenStreetMap): the image's presence facts (``Is there a road?`` /
  ``Is a water area present?`` answered ``yes``: the simple objects, no attributes or relations) and, for
  RSVQA-LR, the rural / urban answer, joined into three sentences that differ in order and wording
  (``A rural area with farmland, a forest and a road.``). Objects answered ``no`` are never named; a tile with no
  ``yes`` fact gets ``An area without buildings, roads or water.`` only if those three were asked and denied,
  else no derived caption.
These sentences train the experts and the router on sensors and resolutions the human captions do not cover;
they are never scored as human-caption quality (``rsmoe evaluate`` scores captions on human references only).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from engine.model.covers import join_words
from training.data.records import CaptionRecord, VQARecord

#: Three derived sentences per EuroSAT class.
EUROSAT_CAPTIONS: dict[str, tuple[str, str, str]] = {
    "AnnualCrop": ("Fields of annual crops cover the area.", "This is an area of annual cropland with fields.",
                   "Many crop fields lie next to each other."),
    "Forest": ("A dense forest covers the whole area.", "This is a forest.", "The area is covered with trees."),
    "HerbaceousVegetation": ("This is an area of herbaceous vegetation.", "Natural grass and shrubs cover the area.",
                             "The land is covered by herbaceous vegetation."),
    "Highway": ("A highway runs through the area.", "This is a highway between fields.",
                "A large road crosses the area."),
    "Industrial": ("This is an industrial area with large buildings.", "Large industrial buildings stand close together.",
                   "An industrial area with factories and warehouses."),
    "Pasture": ("This is a pasture.", "Green meadows used as pasture cover the area.",
                "The area is covered by grassland used for grazing."),
    "PermanentCrop": ("This is an area of permanent cropland such as orchards or vineyards.",
                      "Rows of orchards and vineyards cover the area.", "Permanent crops are planted in rows."),
    "Residential": ("This is a residential area with many houses.", "Houses and streets cover the area.",
                    "Many houses stand along the streets."),
    "River": ("A river flows through the area.", "This is a river with fields on its banks.",
              "A river winds across the land."),
    "SeaLake": ("This is a body of water, a sea or a lake.", "Water covers the whole area.", "The area is open water."),
}

_PRESENCE = (re.compile(r"^is there an? (?P<obj>[a-z ]+?)\??$"),
             re.compile(r"^is an? (?P<obj>[a-z ]+?) present(?: in the image)?\??$"),
             re.compile(r"^are there (?P<obj>[a-z ]+?)\??$"))
_COMPOUND = re.compile(r"\b(or|and|than|next|left|right|top|bottom|of|at|in|on|near|small|large|medium|circular|"
                       r"rectangular|square)\b")
_MAX_OBJECT_WORDS = 3


def with_derived_captions(record: CaptionRecord) -> CaptionRecord:
    """A EuroSAT record with its class's derived sentences as captions; other records unchanged."""
    if record.captions or record.dataset != "eurosat" or record.class_name not in EUROSAT_CAPTIONS:
        return record
    return replace(record, captions=list(EUROSAT_CAPTIONS[record.class_name]))


def presence_object(question: str) -> str | None:
    """The simple object a presence question asks about (``Is a water area present?`` -> ``water area``)."""
    text = " ".join(question.lower().split())
    for pattern in _PRESENCE:
        match = pattern.match(text)
        if match:
            obj = match.group("obj").strip()
            if len(obj.split()) <= _MAX_OBJECT_WORDS and not _COMPOUND.search(obj):
                return obj
    return None


#: How an RSVQA object reads in a derived caption, in the order captions name them (others keep their name).
OBJECT_WORDS: dict[str, str] = {
    "water area": "water", "farmland": "farmland", "forest": "forest", "grass area": "grassland",
    "residential area": "houses", "residential building": "houses", "commercial building": "commercial buildings",
    "industrial area": "industrial buildings", "building": "buildings", "road": "roads", "park": "a park",
    "school": "a school", "scrub": "scrub", "heath": "heath", "meadow": "meadow",
}
_SKIPPED_OBJECTS = {"pedestrian", "place of worship", "religious building"}
_MAX_NAMED = 5


def capital(text: str) -> str:
    return text[0].upper() + text[1:]


def rsvqa_captions(questions: Sequence[VQARecord]) -> list[str]:
    """Three derived sentences from one image's questions (empty when the facts say nothing)."""
    present: dict[str, None] = {}
    absent: set[str] = set()
    setting = None
    for q in questions:
        if q.question_type == "rural_urban" and q.answer in ("rural", "urban"):
            setting = q.answer
        elif q.question_type == "presence":
            obj = presence_object(q.question)
            if obj and obj not in _SKIPPED_OBJECTS:
                (present.__setitem__(obj, None) if q.answer == "yes" else absent.add(obj))
    order = list(OBJECT_WORDS)
    found = sorted((o for o in present if o not in absent), key=lambda o: order.index(o) if o in order else len(order))
    words = list(dict.fromkeys(OBJECT_WORDS.get(o, o) for o in found))
    if "buildings" in words and any(w in words for w in ("houses", "commercial buildings", "industrial buildings")):
        words.remove("buildings")
    words = words[:_MAX_NAMED]
    area = f"{setting} area" if setting else "area"
    if not words:
        if {"building", "road", "water area"} <= absent:
            return [f"{capital(setting + ' area') if setting else 'An area'} without buildings, roads or water."] * 3
        return []
    article = "an" if area[0] in "aeiou" else "a"
    return [f"{capital(article)} {area} with {join_words(words)}.", f"This {area} has {join_words(words[::-1])}.",
            f"{capital(join_words(words))} can be seen in this {area}."]


def rsvqa_image_records(questions: Sequence[VQARecord], input_size: int) -> list[CaptionRecord]:
    """One caption record per RSVQA image of ``questions`` (id from ``extra["image_id"]``), with derived
    captions and the image's native resolution and width (read from the GeoTIFF where the set does not say)."""
    from engine.raster import RasterSource

    by_image: dict[Path, list[VQARecord]] = defaultdict(list)
    for q in questions:
        by_image[q.image_path].append(q)
    records = []
    for path, image_questions in sorted(by_image.items()):
        first = image_questions[0]
        with RasterSource(path) as source:
            native = first.ground_resolution_m or source.ground_resolution
            width = source.width
        records.append(CaptionRecord(image_id=int(first.extra["image_id"]), image_path=path, split=first.split,
                                     class_name=None, captions=rsvqa_captions(image_questions), dataset=first.dataset,
                                     filename=first.image, ground_resolution_m=native, width=width))
    return records
