"""EuroSAT mosaics: Sentinel-2 land cover at the scale the engine reads Sentinel-2 (a 256 px tile, 11.4 m seen).

EuroSAT's 64 px patches (10 m) are magnified 3.5x to fill the model input, so on its own the set teaches what a
640 m patch looks like at 2.9 m per pixel; a 256 px Sentinel-2 tile (2.56 km, the README's example) is seen at
11.4 m per pixel, where the only labelled imagery is RSVQA-LR's few tiles. A mosaic lays 4 x 4 EuroSAT patches of
one split side by side (each in a random dihedral view) into one 256 px image at 10 m: one class (a pure scene),
or a patchwork of a main areal class with one to three others (a block of cells, or a row or column of cells for a
river or a highway), as a landscape mixes fields, forest and water. Half the patchworks are finer: 8 x 8 cells
of 32 px crops (320 m, the size of real fields and woods, as on the README's Virginia example), their other
covers in one or two blocks each; rivers and highways only in the 4 x 4 ones (a 32 px crop may miss the line).

Each mosaic's class is the class of most cells; its captions are **derived** from the cells (when the records are
loaded), in the style of the RSVQA-derived ones, land covers by area: ``This is a rural area of farmland with a
forest and a river.`` (the first, also the theme expert's target: :func:`training.data.subtasks.targets_for_record`),
``Farmland with a forest and a river.``, ``A forest and a river in a rural area of farmland.``; the class's three
EuroSAT sentences for a pure mosaic (:data:`training.data.derived.EUROSAT_CAPTIONS`). The set is written
once into a folder laid out like EuroSAT's (``dataset.json`` + ``images/``, the cells of each mosaic in
``cells``), so ``rsmoe evaluate`` scores its classes, and never its derived sentences.
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from engine.errors import UserInputError
from engine.model.covers import COVER_FORMS, join_words
from training.data.derived import EUROSAT_CAPTIONS, capital
from training.data.loaders import load_class_folder
from training.data.records import CaptionRecord

log = logging.getLogger(__name__)

MOSAIC_SET = "eurosat_mosaic"  # the records' dataset name (not class-labelled images: each holds several covers)
PATCH_PX = 64  # EuroSAT's patches
GRID = 4  # cells a side: 4 x 64 px (whole EuroSAT patches) = a 256 px tile
FINE_GRID = 8  # cells a side of a fine patchwork: 8 x 32 px crops
FINE_SHARE = 0.5  # of the patchworks (not of the pure mosaics)
PURE_SHARE = 0.25
FORMAT = 3  # bumped when the layout changes (a folder of another format is rewritten; captions are not stored)
#: The land cover (a :data:`engine.model.covers.COVER_FORMS` key) of each EuroSAT class, and how it reads in a
#: mosaic caption (``COVER_WORDS``: as the main cover, as a further one; the linear classes, river and highway, are never the main one).
#: Crops, pasture and orchards all read as farmland: in a mixed 10 m tile they look alike (the model named them
#: at random), and farmland is what a user expects there (and what the RSVQA-LR-derived captions of real
#: Sentinel-2 tiles say); classes that read alike count as one cover.
COVER_OF_EUROSAT: dict[str, str] = {
    "AnnualCrop": "farmland", "Pasture": "farmland", "PermanentCrop": "farmland", "Forest": "forest",
    "HerbaceousVegetation": "grassland", "Residential": "houses", "Industrial": "industrial buildings",
    "SeaLake": "water", "River": "river", "Highway": "highway",
}
COVER_WORDS: dict[str, tuple[str | None, str]] = {c: COVER_FORMS[cover] for c, cover in COVER_OF_EUROSAT.items()}
LINEAR = ("River", "Highway")
#: The cover each EuroSAT class counts as when a caption is checked against a mosaic's cells (``rsmoe evaluate``
#: on a mosaic folder): classes a caption of a 10 m tile may fairly name either way are one cover.
_SCORED_AS = {"houses": "built-up", "industrial buildings": "built-up", "river": "water", "highway": "road"}
COVER_OF_CLASS: dict[str, str] = {c: _SCORED_AS.get(cover, cover) for c, cover in COVER_OF_EUROSAT.items()}
#: Caption words naming each cover, in any set's wording the captioner learnt (EuroSAT's, UCM's, AID's, RSVQA's).
COVER_NAMES: dict[str, re.Pattern[str]] = {cover: re.compile(rf"\b(?:{words})", re.IGNORECASE) for cover, words in {
    "farmland": r"farmland|cropland|crop|pasture|orchard|vineyard|agricultur|field",
    "forest": r"forest|trees|wood", "grassland": r"grass|herbaceous|meadow|shrub",
    "built-up": r"house|residential|industrial|building|factor|warehouse|village|town",
    "water": r"water|lake|river|sea\b|pond", "road": r"highway|road",
}.items()}
_BLOCKS = ((2, 2), (2, 3), (3, 2), (1, 2), (2, 1), (3, 3))  # of a GRID layout
_FINE_SIDES = (2, 2, 3, 3, 4)  # block sides of a FINE_GRID layout


def mosaic_captions(cells: Sequence[str]) -> list[str]:
    """Three derived sentences for a mosaic of ``cells`` (EuroSAT class names): the pure class's own, else the
    main cover with the others by area (classes with the same words are one cover)."""
    if len(set(cells)) == 1:
        return list(EUROSAT_CAPTIONS[cells[0]])
    area_of: Counter[str] = Counter(COVER_WORDS[c][1] for c in cells)  # by cover, its further-cover words
    main_of = {COVER_WORDS[c][1]: (COVER_WORDS[c][0], c) for c in cells}
    order = sorted(area_of, key=lambda w: (-area_of[w], w))
    main = next(w for w in order if main_of[w][0])
    main_words, main_class_name = str(main_of[main][0]), main_of[main][1]
    others = [w for w in order if w != main]
    area = "an urban area" if main_class_name in ("Residential", "Industrial") else "a rural area"
    if not others:
        return [f"This is {area} of {main_words}.", f"{capital(area)} of {main_words}.",
                f"{capital(main_words)} in {area}."]
    return [f"This is {area} of {main_words} with {join_words(others)}.",
            f"{capital(main_words)} with {join_words(others)}.",
            f"{capital(join_words(others))} in {area} of {main_words}."]


def mosaic_covers(cells: Sequence[str]) -> set[str]:
    """The covers a mosaic of ``cells`` (EuroSAT class names) shows."""
    return {COVER_OF_CLASS[c] for c in cells}


def covers_named(caption: str) -> set[str]:
    """The covers (:data:`COVER_NAMES`) a caption names."""
    return {cover for cover, pattern in COVER_NAMES.items() if pattern.search(caption)}


def main_class(cells: Sequence[str]) -> str:
    """The class of most cells (ties: the areal class first, then by name)."""
    counts = Counter(cells)
    return min(counts, key=lambda c: (-counts[c], c in LINEAR, c))


def mosaic_layout(classes: Sequence[str], rng: random.Random, grid: int = GRID,
                  pure_share: float = PURE_SHARE) -> list[str]:
    """The classes of a mosaic's cells (row-major, ``grid`` x ``grid``; GRID x GRID for a pure one): one class, or
    a main areal class with one to three others (a block, or a full row or column for a linear class; in a fine
    grid one or two blocks of an areal class and no linear one), the main class keeping most cells."""
    if rng.random() < pure_share:
        return [rng.choice(list(classes))] * GRID * GRID  # a pure mosaic: whole patches
    areal = [c for c in classes if c not in LINEAR]
    if len(areal) < 2:
        grid = GRID  # a fine grid mixes areal classes only
    fine = grid != GRID
    while True:
        main = rng.choice(areal)
        layout = [[main] * grid for _ in range(grid)]
        candidates = [c for c in classes if c != main and not (fine and c in LINEAR)]
        for other in rng.sample(candidates, min(len(candidates), rng.choice((1, 2, 2, 3)))):
            if other in LINEAR:
                line, across = rng.randrange(grid), rng.random() < 0.5
                for i in range(grid):
                    row, col = (line, i) if across else (i, line)
                    layout[row][col] = other
                continue
            for _ in range(rng.choice((1, 2)) if fine else 1):
                h, w = (rng.choice(_FINE_SIDES), rng.choice(_FINE_SIDES)) if fine else rng.choice(_BLOCKS)
                top, left = rng.randrange(grid - h + 1), rng.randrange(grid - w + 1)
                for r in range(top, top + h):
                    for c in range(left, left + w):
                        layout[r][c] = other
        cells = [c for row in layout for c in row]
        if main_class(cells) == main and len(set(cells)) > 1:
            return cells


def write_mosaics(eurosat_root: str | Path, out_root: str | Path, counts: dict[str, int], seed: int = 0) -> Path:
    """Write ``counts[split]`` mosaics of each split of ``eurosat_root`` into ``out_root`` (a class-folder set);
    a folder already written with the same sources, counts and seed is kept as it is."""
    eurosat_root, out_root = Path(eurosat_root), Path(out_root)
    signature = {"format": FORMAT, "source": str(eurosat_root.resolve()), "counts": dict(sorted(counts.items())),
                 "seed": seed, "grid": [GRID, FINE_GRID]}
    index_path = out_root / "dataset.json"
    if index_path.is_file() and json.loads(index_path.read_text()).get("mosaic") == signature:
        return out_root
    patches = load_class_folder(eurosat_root)
    by_split_class: dict[tuple[str, str], list[Path]] = {}
    for r in patches:
        by_split_class.setdefault((r.split, str(r.class_name)), []).append(r.image_path)
    classes = sorted({str(r.class_name) for r in patches})
    unknown = sorted(set(classes) - set(COVER_WORDS))
    if unknown:
        raise UserInputError(f"{eurosat_root}: classes without mosaic words (not EuroSAT's?): {unknown}")
    if not any(c not in LINEAR for c in classes) or len(classes) < 2:
        raise UserInputError(f"{eurosat_root}: mosaics need two classes or more, one of them not {LINEAR}")
    for split in counts:
        missing = [c for c in classes if (split, c) not in by_split_class]
        if missing:
            raise UserInputError(f"{eurosat_root}: no {split} patches of {missing} to lay mosaics with")
    rng = random.Random(seed)
    images = []
    size = 0
    (out_root / "images").mkdir(parents=True, exist_ok=True)
    for split, count in sorted(counts.items()):
        for i in range(count):
            cells = mosaic_layout(classes, rng, FINE_GRID if rng.random() < FINE_SHARE else GRID)
            grid = math.isqrt(len(cells))
            tiles = [_cell(rng.choice(by_split_class[(split, name)]), GRID * PATCH_PX // grid, rng)
                     for name in cells]
            rows = [np.concatenate(tiles[r * grid:(r + 1) * grid], axis=1) for r in range(grid)]
            mosaic = np.ascontiguousarray(np.concatenate(rows, axis=0))
            size = mosaic.shape[1]
            filename = f"{split}_{i:05d}.png"
            Image.fromarray(mosaic).save(out_root / "images" / filename)
            images.append({"filename": filename, "class": main_class(cells), "split": split, "cells": cells})
    index = {"dataset": MOSAIC_SET, "classes": classes, "ground_resolution_m": patches[0].ground_resolution_m,
             "image_size": size, "images": images, "mosaic": signature}
    index_path.write_text(json.dumps(index) + "\n")
    log.info("wrote %d EuroSAT mosaics (%s) into %s", len(images), counts, out_root)
    return out_root


def _cell(path: Path, size: int, rng: random.Random) -> np.ndarray:
    """One cell of a mosaic: the patch at ``path`` (or a random ``size`` px crop of it) in a random dihedral view."""
    with Image.open(path) as im:
        patch = np.asarray(im.convert("RGB"))
    top, left = rng.randrange(patch.shape[0] - size + 1), rng.randrange(patch.shape[1] - size + 1)
    tile = np.rot90(patch[top:top + size, left:left + size], rng.randrange(4))
    return tile[:, ::-1] if rng.random() < 0.5 else tile


def load_mosaics(root: str | Path, split: str) -> list[CaptionRecord]:
    """A mosaic folder's records of ``split`` with their derived captions."""
    return [replace(r, dataset=MOSAIC_SET, captions=mosaic_captions(r.parts))
            for r in load_class_folder(root, split=split)]
