"""Caption CIDEr split by whether the routed scene was right: where does one model lose to another?

``python -m training.scene_split --data ../shared/data/ucm_captions --scenes EVAL/scenes.json
EVAL_A/captions.json EVAL_B/captions.json`` takes the images' plan scenes from one ``rsmoe evaluate`` run
(its ``scenes.json``: the scene each image's caption plan named, ``null`` where none) and scores each caption
file on those images, image by image (pycocoevalcap's per-image CIDEr, IDF over all of them), then averages
over the images whose plan named their class and over the others. Prints (and with ``--out`` writes) JSON.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from engine.errors import UserInputError
from training.data import load_karpathy
from training.data.loaders import read_json
from training.data.records import CaptionRecord
from training.data.vocab import class_phrase
from training.metrics import per_image_cider
from training.report_tool import read_captions, run_report_tool


def right_scene_images(records: list[CaptionRecord], scenes: dict[str, dict]) -> set[int]:
    """The images whose plan named their class phrase (``scenes``: an evaluation's ``scenes.json``)."""
    return {r.image_id for r in records
            if class_phrase(r.class_name) and scenes[str(r.image_id)].get("scene") == class_phrase(r.class_name)}


def scene_split(records: list[CaptionRecord], right: set[int], predictions: dict[int, str]) -> dict[str, Any]:
    """Mean per-image CIDEr of ``predictions`` (image id -> caption) over all, right-scene and wrong-scene images."""
    scores = per_image_cider(predictions, {r.image_id: r.captions for r in records})
    out: dict[str, Any] = {}
    for name, ids in (("all", list(scores)), ("right_scene", [i for i in scores if i in right]),
                      ("wrong_scene", [i for i in scores if i not in right])):
        out[name] = {"images": len(ids), "CIDEr": round(sum(scores[i] for i in ids) / len(ids), 4) if ids else None}
    return out


def _report(args: argparse.Namespace) -> dict[str, Any]:
    scenes = read_json(args.scenes, "scenes file (written by rsmoe evaluate)")
    if not isinstance(scenes, dict) or not all(isinstance(v, dict) for v in scenes.values()):
        raise UserInputError(f"{args.scenes} is not a scenes.json of rsmoe evaluate (an object keyed by image id)")
    records = [r for r in load_karpathy(args.data / "dataset.json", images_dir=args.data / "images")
               if r.split == args.split and str(r.image_id) in scenes]
    if not records:
        raise UserInputError(f"{args.scenes} names no image of the {args.split!r} split")
    right = right_scene_images(records, scenes)
    return {"scenes_from": str(args.scenes), "split": args.split,
            "models": {str(path): scene_split(records, right, read_captions(path))
                       for path in args.captions}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder with dataset.json (Karpathy format)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--scenes", type=Path, required=True, help="scenes.json of the run whose scenes split")
    parser.add_argument("captions", type=Path, nargs="+", help="captions.json files (COCO results format)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    return run_report_tool(lambda: _report(args), args.out)


if __name__ == "__main__":
    sys.exit(main())
