"""Caption decoding on this CPU: greedy against beam search (``generation.num_beams``), side by side in one run.

For each number of beams, concise captions (the product's default) of UCM test images through the default
backend (ONNX Runtime fp32), at batch 1 and with all images in one batch (at most the engine's default batch);
rounds interleaved, best of N, so that the other load on this shared machine hits every setting alike. Writes
seconds per image, the ratio to greedy and the captions.

    .venv/bin/python bench/bench_decoding.py [--model DIR] [--beams 1,3] [--images 16] [--rounds 3]
        [--out bench/results/decoding_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_onnx import ucm_test_images  # noqa: E402  (after the repository is on the path)
from engine.pipeline import DEFAULT_BATCH_SIZE  # noqa: E402

log = logging.getLogger("bench_decoding")


def caption_seconds(model: Any, images: list[Any], batch: int) -> tuple[float, list[str]]:
    """Wall seconds to caption ``images`` (concise) in batches of ``batch``, and the captions."""
    captions: list[str] = []
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        captions += [r.text for r in model.caption(images[i:i + batch], style="concise")]
    return time.perf_counter() - start, captions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "engine" / "models" / "rsmoe-lite"))
    parser.add_argument("--beams", default="1,3", help="comma-separated numbers of beams (1: greedy)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "decoding_cpu.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from PIL import Image

    from engine.runtime import load_model

    model = load_model(args.model, backend="onnx")
    paths = ucm_test_images(args.images)
    images = [Image.open(p).convert("RGB") for p in paths]
    beams = [int(b) for b in args.beams.split(",")]
    batches = [1, min(len(images), DEFAULT_BATCH_SIZE)]
    best: dict[tuple[int, int], float] = {}
    captions: dict[int, list[str]] = {}
    loadavg_before = os.getloadavg()
    for round_no in range(args.rounds):
        for batch in batches:
            for n in beams:
                model.config.generation.num_beams = n
                seconds, texts = caption_seconds(model, images, batch)
                best[(n, batch)] = min(best.get((n, batch), seconds), seconds)
                captions[n] = texts
                log.info("round %d, batch %d, %d beam(s): %.2f s", round_no, batch, n, seconds)
    results: dict[str, Any] = {}
    for n in beams:
        per_batch = {}
        for batch in batches:
            per_image = best[(n, batch)] / len(images)
            per_batch[str(batch)] = {"seconds_per_image": round(per_image, 4),
                                     "over_greedy": round(best[(n, batch)] / best[(1, batch)], 3)
                                     if (1, batch) in best else None}
        results[str(n)] = {"batches": per_batch, "captions": dict(zip((p.name for p in paths), captions[n]))}
    report = {
        "command": "python bench/bench_decoding.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_before": loadavg_before,
                    "loadavg_after": os.getloadavg()},
        "model": os.path.relpath(args.model, REPO), "backend": model.describe(), "images": len(images),
        "style": "concise", "rounds": args.rounds, "results_by_beams": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
