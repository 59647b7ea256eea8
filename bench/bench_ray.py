"""Scale-out on Ray against the one-process run, side by side on this machine (writes JSON).

What it measures (each configuration in a fresh child process, one after the other in one run)
    - ``jobs``: the embedded model (``--backend auto``, what the README's set-up runs) annotating several real
      rasters (``examples/sentinel2_virginia_512.tif`` and ``tests/data/s2_crop512.tif`` by default) in one job,
      as ``rsmoe annotate A B --out-dir D [--ray local --ray-workers N]`` does (:func:`engine.jobs.annotate_rasters`):
      ``plain`` (this process's model), ``ray-1`` and ``ray-2`` (a local Ray instance with 1 / 2 workers of one
      CPU each). Per configuration: ``setup_s`` (model load; for Ray: starting Ray and every worker loading its
      model), ``annotate_s`` and ``tiles_per_s`` (the captioning itself), ``total_s`` (both), and whether every
      GeoJSON is byte-identical to the plain run's;
    - ``single_raster``: the same for the first raster alone, and Ray's overhead there (total seconds over the
      plain run's).

    .venv/bin/python bench/bench_ray.py [--rasters A.tif,B.tif] [--tile-size 128] [--configs plain,ray-1,ray-2]
        [--backend auto|torch|onnx] [--out bench/results/ray_cpu.json]

A plain run uses every core for one model (intra-op threads); a Ray worker of one CPU uses one thread, and two
workers caption two groups at once. On a machine busy with other work, threads that wait for each other lose
much more than single-threaded workers do: ``machine.load_avg_*`` says how busy it was.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RASTERS = [REPO / "examples" / "sentinel2_virginia_512.tif", REPO / "tests" / "data" / "s2_crop512.tif"]
#: configuration -> Ray workers (None: no Ray, this process's model)
CONFIGS = {"plain": None, "ray-1": 1, "ray-2": 2}

log = logging.getLogger("bench_ray")


def run_one(rasters: list[Path], tile_size: int, workers: int | None, out_dir: Path, backend: str) -> dict[str, Any]:
    """One job in this process: setup, annotation, outputs (child mode)."""
    from engine.batch import output_paths
    from engine.jobs import AnnotateParams, LocalCaptioner, annotate_rasters
    from engine.pipeline import Pipeline

    jobs = [AnnotateParams(raster=str(r), out=str(o), tile_size=tile_size)
            for r, o in zip(rasters, output_paths(rasters, out_dir))]
    start = time.perf_counter()
    if workers is None:
        captioner: Any = LocalCaptioner(Pipeline.load(backend=backend))
        closing = None
    else:
        from engine.distributed import RayCaptioner, RayOptions
        from engine.runtime import ModelSpec

        captioner = closing = RayCaptioner(ModelSpec(backend=backend), RayOptions("local", workers=workers))
    setup = time.perf_counter() - start
    try:
        begin = time.perf_counter()
        outcomes = annotate_rasters(jobs, captioner, fail_fast=True)
        annotate = time.perf_counter() - begin
    finally:
        if closing is not None:
            closing.close()
    tiles = sum(o.result.total for o in outcomes if o.result)
    return {"workers": workers, "backend": captioner.info.backend, "rasters": len(rasters), "tiles": tiles,
            "setup_s": round(setup, 2), "annotate_s": round(annotate, 2), "total_s": round(setup + annotate, 2),
            "tiles_per_s": round(tiles / annotate, 3), "outputs": [o.params.out for o in outcomes]}


def child(rasters: list[Path], tile_size: int, config: str, out_dir: Path, backend: str) -> dict[str, Any]:
    """Run one configuration in a fresh process (its own model, its own Ray instance)."""
    cmd = [sys.executable, __file__, "--child", config, "--rasters", ",".join(map(str, rasters)),
           "--tile-size", str(tile_size), "--out", str(out_dir), "--backend", backend]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"{config} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rasters", default=",".join(map(str, RASTERS)))
    parser.add_argument("--tile-size", type=int, default=128)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ray_cpu.json")
    parser.add_argument("--backend", default="auto", help="the model's backend (default auto: the ONNX export "
                                                          "when present and current, else torch)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    rasters = [Path(p) for p in args.rasters.split(",")]
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        sys.stdout.write(json.dumps(run_one(rasters, args.tile_size, CONFIGS[args.child], args.out, args.backend)) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    configs = args.configs.split(",")
    report: dict[str, Any] = {
        "benchmark": "bench/bench_ray.py", "command": " ".join([".venv/bin/python", "bench/bench_ray.py", *sys.argv[1:]]),
        "rasters": [str(r.relative_to(REPO)) if r.is_relative_to(REPO) else str(r) for r in rasters],
        "tile_size": args.tile_size, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                  "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]},
        "date": time.strftime("%Y-%m-%d"), "jobs": {}, "single_raster": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        for part, chosen in (("jobs", rasters), ("single_raster", rasters[:1])):
            plain_bytes: list[bytes] | None = None
            for config in configs:
                out_dir = Path(tmp) / part / config
                log.info("%s: %s on %d raster(s)", part, config, len(chosen))
                try:
                    row = child(chosen, args.tile_size, config, out_dir, args.backend)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:  # recorded; the other configurations go on
                    report[part][config] = {"error": str(exc).strip().splitlines()[-1][:500]}
                    log.warning("  %s failed: %s", config, report[part][config]["error"])
                    continue
                outputs = [Path(p).read_bytes() for p in row.pop("outputs")]
                if config == "plain":
                    plain_bytes = outputs
                row["identical_to_plain"] = None if plain_bytes is None else outputs == plain_bytes
                report[part][config] = row
                log.info("  %s", json.dumps(row))
            plain = report[part].get("plain")
            for config, row in report[part].items():
                if plain and "error" not in plain and "error" not in row and config != "plain":
                    row["total_over_plain"] = round(row["total_s"] / plain["total_s"], 2)
                    row["tiles_per_s_over_plain"] = round(row["tiles_per_s"] / plain["tiles_per_s"], 2)
    single = report["single_raster"]
    if "total_s" in single.get("plain", {}):
        report["ray_overhead_single_raster_s"] = {c: round(r["total_s"] - single["plain"]["total_s"], 2)
                                                  for c, r in single.items() if c != "plain" and "total_s" in r}
    report["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
