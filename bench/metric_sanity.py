"""Sanity check of the caption scorer: human references scored against each other (writes JSON).

On the UCM-captions test split (210 images), each image's reference number ``--hold-out`` (default 0, the
first) is the candidate and the other four are the references. With the first held out the project lead
measured BLEU-4 ~0.66 and CIDEr ~3.29 with this scorer; a model is not expected to beat these figures by much.

    .venv/bin/python bench/metric_sanity.py --out runs/metric_sanity.json [--all-hold-outs] [--no-meteor]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data.loaders import load_ucm_captions  # noqa: E402
from training.metrics import MeteorScorer, caption_metrics  # noqa: E402

log = logging.getLogger("metric_sanity")


def hold_out_scores(records: list, hold: int, scorer: MeteorScorer | None) -> dict[str, float]:
    predictions = {r.image_id: r.captions[hold] for r in records}
    references = {r.image_id: [c for i, c in enumerate(r.captions) if i != hold] for r in records}
    return caption_metrics(predictions, references, meteor=scorer is not None, meteor_scorer=scorer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="UCM-captions folder (default: shared data)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--hold-out", type=int, default=0, help="which reference is the candidate (0-4)")
    parser.add_argument("--all-hold-outs", action="store_true", help="also report hold-outs 0..4")
    parser.add_argument("--no-meteor", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/metric_sanity.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    records = [r for r in load_ucm_captions(args.data, split=args.split, check_images=False) if len(r.captions) >= 5]
    holds = list(range(5)) if args.all_hold_outs else [args.hold_out]
    start = time.perf_counter()
    results: dict[str, dict[str, float]] = {}
    scorer = None if args.no_meteor else MeteorScorer()
    try:
        for hold in holds:
            results[str(hold)] = hold_out_scores(records, hold, scorer)
            log.info("hold-out %d: %s", hold, {k: round(v, 4) for k, v in results[str(hold)].items()})
    finally:
        if scorer is not None:
            scorer.close()
    report = {
        "what": "UCM-captions human reference vs the other four, COCO caption metrics (training.metrics)",
        "split": args.split,
        "images": len(records),
        "hold_out": args.hold_out,
        "metrics": results[str(args.hold_out)] if str(args.hold_out) in results else results[str(holds[0])],
        "per_hold_out": results if args.all_hold_outs else None,
        "expected_hold_out_0": {"BLEU-4": 0.66, "CIDEr": 3.29},
        "normaliser": "training.metrics.normalize_caption (lower-case, punctuation stripped), both sides",
        "seconds": round(time.perf_counter() - start, 1),
        "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
