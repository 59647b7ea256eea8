"""Class-derived VQA: closed questions whose answers follow from an image's scene class (EuroSAT, AID).

This is NOT a human-annotated VQA set: each answer is a fact of the class, listed below only where it holds
for nearly every image of that class ("a River tile shows a river", "a Desert scene has no water", "a
Residential tile is urban"); where a class says nothing sure about an object (a forest tile may hold a
stream) no question is derived. It teaches the answer head the objects GIS users ask about across
resolutions (water, rivers, forest, farmland, buildings) and which ones are absent, small built objects
(tennis courts, parking lots, pools, airplanes, tanks) included, which natural scenes do not hold. Report figures on it as
"class-derived VQA", never as VQA accuracy on a benchmark.

Per image, ``per_image`` (4) questions are drawn (seeded by the image, so the set is deterministic) from its class's
facts, each with one of a few wordings; ``type`` is RSVQA's (``presence``, ``rural_urban``).
"""
from __future__ import annotations

import random
import re
from typing import Sequence

from training.data.records import CaptionRecord, VQARecord

DATASET_NAME = "class-derived VQA"

#: Wordings of a presence question about an object (``{a}`` the singular with its article, ``{s}`` the plural).
PRESENCE_WORDINGS: tuple[str, ...] = ("Is there {a}?", "Are there any {s}?", "Is {a} present?",
                                      "Does this image show {a}?")
RURAL_URBAN_WORDINGS: tuple[str, ...] = ("Is this a rural or an urban area?", "Is it a rural or an urban area?",
                                         "Is this area rural or urban?")
OBJECTS: dict[str, tuple[str, str]] = {  # object -> (singular with article, plural)
    "river": ("a river", "rivers"),
    "water": ("a water area", "water areas"),
    "forest": ("a forest", "forests"),
    "farmland": ("farmland", "farmlands"),
    "building": ("a building", "buildings"),
    "tennis court": ("a tennis court", "tennis courts"),
    "parking lot": ("a parking lot", "parking lots"),
    "swimming pool": ("a swimming pool", "swimming pools"),
    "airplane": ("an airplane", "airplanes"),
    "ship": ("a ship", "ships"),
    "storage tank": ("a storage tank", "storage tanks"),
}

_WATER_FREE = {"river": "no", "water": "no"}
#: Small built objects a natural scene (fields, forest, grassland, open water, desert) does not hold: the head
#: learns "no" for them at the scales of EuroSAT and AID, not only "yes" at UCM's.
_NO_SMALL_BUILT = {"tennis court": "no", "parking lot": "no", "swimming pool": "no", "airplane": "no",
                   "storage tank": "no"}
#: Facts of each class (names lower-cased without separators, so EuroSAT's and AID's spellings both match):
#: object -> "yes" / "no", and ``setting`` -> "rural" / "urban".
CLASS_FACTS: dict[str, dict[str, str]] = {
    # EuroSAT (Sentinel-2, 640 m tiles)
    "annualcrop": {**_NO_SMALL_BUILT, **_WATER_FREE, "farmland": "yes", "forest": "no", "setting": "rural"},
    "permanentcrop": {**_NO_SMALL_BUILT, **_WATER_FREE, "farmland": "yes", "setting": "rural"},
    "pasture": {**_NO_SMALL_BUILT, **_WATER_FREE, "setting": "rural"},
    "herbaceousvegetation": {**_NO_SMALL_BUILT, **_WATER_FREE, "setting": "rural"},
    "forest": {**_NO_SMALL_BUILT, "forest": "yes", "farmland": "no", "building": "no", "setting": "rural"},
    "highway": {**_WATER_FREE},
    "industrial": {**_WATER_FREE, "building": "yes", "forest": "no", "farmland": "no", "setting": "urban"},
    "residential": {**_WATER_FREE, "building": "yes", "forest": "no", "farmland": "no", "setting": "urban"},
    "river": {**_NO_SMALL_BUILT, "river": "yes", "water": "yes", "setting": "rural"},
    "sealake": {**_NO_SMALL_BUILT, "water": "yes", "river": "no", "building": "no", "forest": "no", "farmland": "no",
                "setting": "rural"},
    # AID (Google Earth scenes, about 2-32 m per pixel) where it has other names
    "bareland": {**_NO_SMALL_BUILT, **_WATER_FREE, "forest": "no", "farmland": "no", "setting": "rural"},
    "desert": {**_NO_SMALL_BUILT, **_WATER_FREE, "forest": "no", "farmland": "no", "building": "no", "setting": "rural"},
    "farmland": {**_NO_SMALL_BUILT, "farmland": "yes", "setting": "rural"},
    "meadow": {**_NO_SMALL_BUILT, **_WATER_FREE, "building": "no", "setting": "rural"},
    "mountain": {**_NO_SMALL_BUILT, "farmland": "no", "setting": "rural"},
    "pond": {"water": "yes", "river": "no", "setting": "rural"},
    "beach": {"water": "yes", "river": "no", "forest": "no", "farmland": "no"},
    "port": {"water": "yes", "ship": "yes", "farmland": "no", "forest": "no", "setting": "urban"},
    "airport": {**_WATER_FREE, "airplane": "yes", "forest": "no", "setting": "urban"},
    "parking": {**_WATER_FREE, "parking lot": "yes", "forest": "no", "farmland": "no", "setting": "urban"},
    "playground": {**_WATER_FREE, "farmland": "no", "setting": "urban"},
    "baseballfield": {**_WATER_FREE, "farmland": "no", "setting": "urban"},
    "stadium": {**_WATER_FREE, "building": "yes", "farmland": "no", "setting": "urban"},
    "square": {**_WATER_FREE, "building": "yes", "farmland": "no", "forest": "no", "setting": "urban"},
    "church": {**_WATER_FREE, "building": "yes", "farmland": "no", "forest": "no", "setting": "urban"},
    "commercial": {**_WATER_FREE, "building": "yes", "farmland": "no", "forest": "no", "setting": "urban"},
    "center": {"building": "yes", "farmland": "no", "forest": "no", "setting": "urban"},
    "denseresidential": {**_WATER_FREE, "building": "yes", "farmland": "no", "forest": "no",
                         "setting": "urban"},
    "mediumresidential": {"building": "yes", "farmland": "no", "setting": "urban"},
    "sparseresidential": {"building": "yes"},
    "school": {"building": "yes", "farmland": "no", "setting": "urban"},
    "railwaystation": {"building": "yes", "farmland": "no", "setting": "urban"},
    "storagetanks": {**_WATER_FREE, "storage tank": "yes", "farmland": "no", "forest": "no", "setting": "urban"},
    "bridge": {"water": "yes"},
    "viaduct": {"setting": "urban"},
}


def class_key(name: str) -> str:
    """A class name as :data:`CLASS_FACTS` keys it (``SeaLake``, ``Sea Lake``, ``sea_lake`` -> ``sealake``)."""
    return re.sub(r"[^a-z]", "", name.lower())


def combined_facts(classes: Sequence[str]) -> dict[str, str]:
    """The facts of an image made of patches of ``classes`` (a mosaic): an object is there when one patch's class
    shows it and absent only when every patch's class lacks it; rural / urban only when every patch says the
    same. No facts when a class has none."""
    per_class = [CLASS_FACTS.get(class_key(c)) for c in set(classes)]
    if not per_class or any(f is None for f in per_class):
        return {}
    facts: dict[str, str] = {}
    for key in sorted({k for f in per_class for k in f}):  # type: ignore[union-attr]
        answers = [f.get(key) for f in per_class]  # type: ignore[union-attr]
        if key == "setting":
            if len(set(answers)) == 1 and answers[0]:
                facts[key] = str(answers[0])
        elif "yes" in answers:
            facts[key] = "yes"
        elif all(a == "no" for a in answers):
            facts[key] = "no"
    return facts


def derive_class_vqa(records: Sequence[CaptionRecord], per_image: int = 4, seed: int = 0) -> list[VQARecord]:
    """Up to ``per_image`` closed questions per class-labelled image from its class's facts (a mosaic's: from
    its patches' classes, :func:`combined_facts`)."""
    out: list[VQARecord] = []
    for record in records:
        facts = (combined_facts(record.parts) if record.parts
                 else CLASS_FACTS.get(class_key(record.class_name or "")))
        if not facts:
            continue
        rng = random.Random(f"{seed}:{record.dataset}:{record.image_id}")
        for key in rng.sample(sorted(facts), min(per_image, len(facts))):
            answer = facts[key]
            if key == "setting":
                question, question_type = rng.choice(RURAL_URBAN_WORDINGS), "rural_urban"
            else:
                singular, plural = OBJECTS[key]
                question, question_type = rng.choice(PRESENCE_WORDINGS).format(a=singular, s=plural), "presence"
            out.append(VQARecord(record.image_path, question, answer, question_type,
                                 f"{record.dataset}:{record.image_id}:{key}", record.split,
                                 record.filename or record.image_path.name, DATASET_NAME,
                                 extra={"derived_from": record.dataset},
                                 ground_resolution_m=record.ground_resolution_m, width=record.width))
    return out
