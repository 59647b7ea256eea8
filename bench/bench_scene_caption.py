"""What a whole scene's caption costs when its land covers come from tiles, side by side with the scene as one image.

A region seen coarser than the trained range is captioned as one image and on a grid of tiles the model knows
(:meth:`engine.pipeline.Pipeline._caption_over_tiles`); "as one image" is the same pipeline with the model's
coarsest trained resolution unset, so no grid is cut. For each scene: concise captions through the default
backend (ONNX Runtime fp32), the feature cache emptied before every call, rounds interleaved, best of N. Writes
seconds per caption, the ratio and both captions.

    .venv/bin/python bench/bench_scene_caption.py [--model DIR] [--rounds 3] [--scene PATH ...]
        [--out bench/results/scene_caption_cpu.json]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench_scene_caption")

SCENES = [REPO / "examples" / "sentinel2_virginia_512.tif",
          REPO.parent / "shared" / "data" / "geotiff" / "sat_testdata" / "sentinel2_truecolor_10m_crop1024.tif"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "engine" / "models" / "rsmoe-lite"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scene", action="append", type=Path, help="a raster (default: the README's example and "
                                                                     "the 1024 px scene it was cut from)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scene_caption_cpu.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from engine.pipeline import Pipeline

    pipeline = Pipeline.load(args.model, backend="onnx")
    resolution = pipeline.model.config.resolution
    coarsest = resolution.max_m
    scenes = [p for p in (args.scene or SCENES) if p.is_file()]
    if not scenes:
        parser.error("no scene raster found")
    best: dict[tuple[str, str], float] = {}
    captions: dict[tuple[str, str], str] = {}
    for _ in range(args.rounds):
        for scene in scenes:
            for mode, max_m in (("tiles", coarsest), ("one image", None)):
                resolution.max_m = max_m
                pipeline.cache.clear()
                start = time.perf_counter()
                result = pipeline.caption(scene)
                seconds = time.perf_counter() - start
                key = (scene.name, mode)
                best[key] = min(best.get(key, seconds), seconds)
                captions[key] = result.text
    resolution.max_m = coarsest
    rows = []
    for scene in scenes:
        tiles, whole = best[(scene.name, "tiles")], best[(scene.name, "one image")]
        rows.append({"scene": scene.name, "seconds_tiles": round(tiles, 3), "seconds_one_image": round(whole, 3),
                     "ratio": round(tiles / whole, 2), "caption_tiles": captions[(scene.name, "tiles")],
                     "caption_one_image": captions[(scene.name, "one image")]})
        log.info("%s: %.2f s from tiles, %.2f s as one image (x%.2f)", scene.name, tiles, whole, tiles / whole)
    report = {"what": "concise caption of a whole scene: land covers from tiles vs as one image (best of rounds, "
                      "feature cache emptied before each call)",
              "model": os.path.relpath(args.model, REPO), "backend": "onnx fp32", "rounds": args.rounds,
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
              "results": rows}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
