"""Choose ``vision.scene_min_confidence`` on val: below which scene-head probability should plans name no scene?

``python -m training.scene_gate --data ../shared/data/ucm_captions --split val --named EVAL_0 --neutral EVAL_1``
takes two ``rsmoe evaluate`` runs of one model on one split: ``--named`` with ``--scene-min-confidence 0``
(every plan names the head's scene; its ``scenes.json`` gives each image's head probability) and ``--neutral``
with ``--scene-min-confidence 1`` (no plan names a scene). For each threshold of a grid it scores the captions
an image would get (the neutral caption where the head's probability is below the threshold, the named one
elsewhere) with per-image pycocoevalcap CIDEr, whose mean is the split's CIDEr (IDF comes from the references
alone), and reports the threshold with the best CIDEr (the smallest of ties). Prints (and with ``--out``
writes) JSON.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from engine.errors import UserInputError
from training.data import load_karpathy
from training.data.loaders import read_json
from training.metrics import per_image_cider
from training.report_tool import read_captions, run_report_tool

#: Thresholds tried: 0, 0.05, ..., 1.
DEFAULT_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))


def gate_scores(named: dict[int, float], neutral: dict[int, float], confidence: dict[int, float],
                grid: tuple[float, ...] = DEFAULT_GRID) -> list[dict[str, Any]]:
    """Mean CIDEr per threshold: per image, ``neutral``'s score where ``confidence`` is below it, else ``named``'s."""
    rows = []
    for threshold in grid:
        gated = [i for i in named if confidence[i] < threshold]
        total = sum(named.values()) + sum(neutral[i] - named[i] for i in gated)
        rows.append({"threshold": threshold, "neutral_images": len(gated), "CIDEr": round(total / len(named), 4)})
    return rows


def _report(args: argparse.Namespace) -> dict[str, Any]:
    named, neutral = read_captions(args.named / "captions.json"), read_captions(args.neutral / "captions.json")
    scenes = read_json(args.named / "scenes.json", "scenes file (written by rsmoe evaluate)")
    if set(named) != set(neutral):
        raise UserInputError(f"{args.named} and {args.neutral} caption different images")
    missing = [i for i in named if (scenes.get(str(i)) or {}).get("confidence") is None]
    if missing:
        raise UserInputError(f"{args.named}/scenes.json has no scene-head probability for {len(missing)} images "
                             "(a model without a scene head, or a template router)")
    references = {r.image_id: r.captions for r in load_karpathy(args.data / "dataset.json",
                                                                images_dir=args.data / "images")
                  if r.split == args.split and r.image_id in named}
    if set(references) != set(named):
        raise UserInputError(f"the captions are not of the {args.split!r} split of {args.data}")
    confidence = {i: float(scenes[str(i)]["confidence"]) for i in named}
    rows = gate_scores(per_image_cider(named, references), per_image_cider(neutral, references), confidence)
    best = max(rows, key=lambda row: (row["CIDEr"], -row["threshold"]))
    return {"split": args.split, "named": str(args.named), "neutral": str(args.neutral), "images": len(named),
            "best": best, "thresholds": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder with dataset.json (Karpathy format)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--named", type=Path, required=True, help="rsmoe evaluate output, --scene-min-confidence 0")
    parser.add_argument("--neutral", type=Path, required=True, help="rsmoe evaluate output, --scene-min-confidence 1")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    return run_report_tool(lambda: _report(args), args.out)


if __name__ == "__main__":
    sys.exit(main())
