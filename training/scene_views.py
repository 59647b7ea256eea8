"""Choose ``vision.scene_views_below`` on val: which images should pay for the scene head's dihedral views?

``python -m training.scene_views --model DIR --ucm ../shared/data/ucm_captions --aid ../shared/data/aid_rsicd
--eurosat ../shared/data/eurosat_rgb --limit eurosat=500 --out OUT.json``

Each val image is encoded once as it is and once per further view (``vision.scene_views``); for each threshold of a
grid an image keeps its single-view scene when the head's probability for it reaches the threshold, else it gets
the view-averaged one (what :meth:`engine.model.routing.MoEInference.view_scene_logits` does at inference). Per set
it reports the accuracy (the head's best class among the set's classes, as ``rsmoe evaluate`` scores it) and the
share of images that pay for the views; the chosen threshold is the smallest whose mean accuracy over the sets is
within ``--tolerance`` of always averaging the views. Prints (and with ``--out`` writes) JSON.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine.errors import UserInputError
from engine.model.routing import MoEInference, softmax_rows
from training.data.records import CaptionRecord
from training.data.sets import CAPTION_SETS, load_mixture
from training.evaluate import class_map
from training.report_tool import run_report_tool

#: Thresholds tried: 0 (never the views), 0.5, 0.6, ..., 0.9, 0.95, 0.99, 1 (always).
DEFAULT_GRID: tuple[float, ...] = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def view_probabilities(model: MoEInference, records: Sequence[CaptionRecord],
                       batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The scene head's probabilities (N, scenes) for each image as it is and averaged over every view."""
    from tqdm import tqdm

    vision = model.config.vision
    always = vision.scene_views_below
    single, averaged = [], []
    try:
        vision.scene_views_below = 1.0
        for start in tqdm(range(0, len(records), batch_size), desc="scene views", unit="batch"):
            pixels = model.preprocess([r.image_path for r in records[start:start + batch_size]])
            visual = model.encode_images(pixels)
            single.append(softmax_rows(model.scene_logits(visual)))
            averaged.append(softmax_rows(model.view_scene_logits(pixels, visual)))
    finally:
        vision.scene_views_below = always
    return np.concatenate(single), np.concatenate(averaged)


def views_scores(single: np.ndarray, averaged: np.ndarray, columns: Sequence[int], truth: Sequence[int],
                 grid: Sequence[float] = DEFAULT_GRID) -> list[dict[str, Any]]:
    """Per threshold: accuracy of the head's best class among ``columns`` (the set's classes; ``truth`` holds
    each image's position in ``columns``) and the share of images below it (those that pay for the views)."""
    confidence = single.max(axis=-1)
    truth_array = np.asarray(truth)
    rows = []
    for threshold in grid:
        below = confidence < threshold if threshold < 1.0 else np.ones_like(confidence, dtype=bool)
        chosen = np.where(below[:, None], averaged, single)[:, list(columns)]
        rows.append({"threshold": threshold, "views_share": round(float(below.mean()), 4),
                     "accuracy": round(float((chosen.argmax(axis=-1) == truth_array).mean()), 4)})
    return rows


def choose_threshold(by_set: dict[str, list[dict[str, Any]]], tolerance: float) -> dict[str, Any]:
    """The smallest threshold whose mean accuracy over the sets is within ``tolerance`` of always the views."""
    grid = [row["threshold"] for row in next(iter(by_set.values()))]
    mean = {t: float(np.mean([rows[k]["accuracy"] for rows in by_set.values()])) for k, t in enumerate(grid)}
    share = {t: float(np.mean([rows[k]["views_share"] for rows in by_set.values()])) for k, t in enumerate(grid)}
    always = mean[grid[-1]]
    best = min(t for t in grid if mean[t] >= always - tolerance)
    return {"threshold": best, "mean_accuracy": round(mean[best], 4), "mean_views_share": round(share[best], 4),
            "always_views_accuracy": round(always, 4), "single_view_accuracy": round(mean[grid[0]], 4)}


def _report(args: argparse.Namespace) -> dict[str, Any]:
    from engine.runtime import load_model

    roots = {name: getattr(args, name) for name in CAPTION_SETS if getattr(args, name)}
    if not roots:
        raise UserInputError("give at least one class-labelled set: --ucm, --aid or --eurosat")
    limits = {}
    for item in args.limit:
        name, _, count = item.partition("=")
        if name not in roots or not count.isdigit():
            raise UserInputError(f"--limit {item!r}: expected SET=N for one of {', '.join(roots)}")
        limits[name] = int(count)
    model = load_model(args.model, backend="torch", device="cpu")
    scenes = model.config.vision.scene_classes
    if not scenes or model.config.vision.scene_views <= 1:
        raise UserInputError(f"{args.model or 'the model'} has no scene head with several views "
                             "(vision.scene_classes, vision.scene_views > 1)")
    by_set: dict[str, list[dict[str, Any]]] = {}
    for name, records in load_mixture(roots, args.split, limits).by_set().items():
        mapping = class_map(sorted({r.class_name for r in records if r.class_name}), scenes)
        labelled = [r for r in records if r.class_name in mapping.names]
        single, averaged = view_probabilities(model, labelled)
        by_set[name] = views_scores(single, averaged, mapping.columns,
                                    [mapping.names.index(r.class_name) for r in labelled])
    return {"model": str(args.model or "embedded"), "split": args.split, "views": model.config.vision.scene_views,
            "tolerance": args.tolerance, "chosen": choose_threshold(by_set, args.tolerance), "by_set": by_set}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the embedded one)")
    for name in CAPTION_SETS:
        parser.add_argument(f"--{name}", default=None, help=f"the {name} set's folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", action="append", default=[], metavar="SET=N", help="evenly spaced images of a set")
    parser.add_argument("--tolerance", type=float, default=0.002, help="accuracy the chosen threshold may lose")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    return run_report_tool(lambda: _report(args), args.out)


if __name__ == "__main__":
    sys.exit(main())
