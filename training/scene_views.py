"""Choose the scene head's views on val: how many dihedral views (``vision.scene_views``) and which images pay
for them (``vision.scene_views_below``)?

``python -m training.scene_views --model DIR --ucm ../shared/data/ucm_captions --aid ../shared/data/aid_rsicd
--eurosat ../shared/data/eurosat_rgb --limit eurosat=500 --out OUT.json``

Each val image is encoded once per dihedral view (all 8). For each view count of :data:`VIEW_COUNTS` (the first
*n* views: the image, its rotations, then the flipped ones) and each threshold of a grid, an image keeps its
single-view scene when the head's probability for it reaches the threshold, else it gets the scene averaged over
its *n* views (what :meth:`engine.model.routing.MoEInference.view_scene_logits` does at inference). Per set it
reports the accuracy (the head's best class among the set's classes, as ``rsmoe evaluate`` scores it) and the
share of images that pay for the views. The choice is the cheapest (fewest extra encoder passes per image on
average over the sets) whose mean accuracy keeps ``--keep-gain`` of what every view on every image adds over
the single view. Prints (and with ``--out`` writes) JSON.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine.errors import UserInputError
from engine.model.image_processing import DIHEDRAL_VIEWS
from engine.model.routing import MoEInference, softmax_rows
from training.data.records import CaptionRecord
from training.data.sets import CAPTION_SETS, load_mixture
from training.evaluate import class_map
from training.report_tool import run_report_tool
from training.scene_head import per_view

#: Thresholds tried: 0 (never the views), 0.5, 0.6, ..., 0.9, 0.95, 0.99, 1 (always).
DEFAULT_GRID: tuple[float, ...] = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
#: View counts tried: the image and one rotation, the four rotations, all eight dihedral views.
VIEW_COUNTS: tuple[int, ...] = (2, 4, DIHEDRAL_VIEWS)


def view_logits(model: MoEInference, records: Sequence[CaptionRecord], batch_size: int = 32) -> np.ndarray:
    """The scene head's logits (N, views, scenes) of each image under each of the 8 dihedral views (the head is
    linear over the mean token, so averaging these logits is what the model does with the views' tokens)."""
    return per_view(model, records, lambda: range(DIHEDRAL_VIEWS), model.scene_logits, batch_size, "scene views")


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


def scores_by_views(logits: np.ndarray, columns: Sequence[int], truth: Sequence[int],
                    counts: Sequence[int] = VIEW_COUNTS, grid: Sequence[float] = DEFAULT_GRID
                    ) -> dict[int, list[dict[str, Any]]]:
    """:func:`views_scores` for each view count, from the per-view logits of :func:`view_logits`."""
    single = softmax_rows(logits[:, 0])
    return {n: views_scores(single, softmax_rows(logits[:, :n].mean(axis=1)), columns, truth, grid) for n in counts}


def choose_views(by_views: dict[int, dict[str, list[dict[str, Any]]]], keep_gain: float) -> dict[str, Any]:
    """The cheapest (view count, threshold) whose mean accuracy over the sets keeps ``keep_gain`` of the gain of
    every view on every image over the single view; cost: extra encoder passes per image, averaged over the sets."""
    candidates = []
    for views, by_set in by_views.items():
        grid = [row["threshold"] for row in next(iter(by_set.values()))]
        for k, threshold in enumerate(grid):
            accuracy = float(np.mean([rows[k]["accuracy"] for rows in by_set.values()]))
            share = float(np.mean([rows[k]["views_share"] for rows in by_set.values()]))
            candidates.append({"views": views, "threshold": threshold, "mean_accuracy": round(accuracy, 4),
                               "mean_views_share": round(share, 4), "extra_passes": round(share * (views - 1), 4)})
    single = next(c["mean_accuracy"] for c in candidates if c["threshold"] == 0.0)
    most = max(by_views)
    always = next(c["mean_accuracy"] for c in candidates if c["views"] == most and c["threshold"] == 1.0)
    floor = single + keep_gain * (always - single) - 1e-9
    best = min((c for c in candidates if c["mean_accuracy"] >= floor),
               key=lambda c: (c["extra_passes"], -c["mean_accuracy"]))
    return {**best, "always_views_accuracy": always, "single_view_accuracy": single}


def _report(args: argparse.Namespace) -> dict[str, Any]:
    from engine.runtime import load_model

    roots = {name: getattr(args, name) for name in CAPTION_SETS if getattr(args, name)}
    if not roots:
        raise UserInputError("give at least one class-labelled set: --ucm, --aid or --eurosat")
    if not 0.0 <= args.keep_gain <= 1.0:
        raise UserInputError(f"--keep-gain must be between 0 and 1, got {args.keep_gain}")
    limits = {}
    for item in args.limit:
        name, _, count = item.partition("=")
        if name not in roots or not count.isdigit():
            raise UserInputError(f"--limit {item!r}: expected SET=N for one of {', '.join(roots)}")
        limits[name] = int(count)
    model = load_model(args.model, backend=args.backend, device="cpu")
    scenes = model.config.vision.scene_classes
    if not scenes:
        raise UserInputError(f"{args.model or 'the model'} has no scene head (vision.scene_classes)")
    by_views: dict[int, dict[str, list[dict[str, Any]]]] = {n: {} for n in VIEW_COUNTS}
    for name, records in load_mixture(roots, args.split, limits).by_set().items():
        mapping = class_map(sorted({r.class_name for r in records if r.class_name}), scenes)
        labelled = [r for r in records if r.class_name in mapping.names]
        scores = scores_by_views(view_logits(model, labelled), mapping.columns,
                                 [mapping.names.index(r.class_name) for r in labelled])
        for views, rows in scores.items():
            by_views[views][name] = rows
    return {"model": str(args.model or "embedded"), "split": args.split, "keep_gain": args.keep_gain,
            "chosen": choose_views(by_views, args.keep_gain),
            "by_views": {str(views): by_set for views, by_set in by_views.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the embedded one)")
    for name in CAPTION_SETS:
        parser.add_argument(f"--{name}", default=None, help=f"the {name} set's folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", action="append", default=[], metavar="SET=N", help="evenly spaced images of a set")
    parser.add_argument("--keep-gain", type=float, default=0.85,
                        help="share of the views' accuracy gain the choice must keep (default 0.85: on val sets "
                             "of a few hundred images one image moves the mean by about 0.001)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"),
                        help="the backend that encodes the views (same figures; onnx is faster)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    return run_report_tool(lambda: _report(args), args.out)


if __name__ == "__main__":
    sys.exit(main())
