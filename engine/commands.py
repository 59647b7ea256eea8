"""The engine's subcommands of ``rsmoe`` (registered through the ``rsmoe.commands`` entry point).

Handlers import the heavy modules lazily so ``rsmoe --help`` stays quick.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--backend``, ``--device``, ``--dtype``: shared by every command that runs the model."""
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory (default: the embedded rsmoe-lite, or $RSMOE_MODEL)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"],
                        help="inference backend: auto (default: onnx when the model's exported graphs are "
                             "present and current, else torch), torch, or onnx (graphs written by `rsmoe export`)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "int8", "static"],
                        help="compute precision (default: float32); int8 and static name exported ONNX "
                             "variants (--backend onnx only)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("base-models", help="provision the pretrained base weights into the local cache")
    p.add_argument("names", nargs="*", help="base models to provision (default: all)")
    p.add_argument("--force", action="store_true", help="rebuild the cache even if present")
    p.add_argument("--verify", action="store_true", help="only verify the cache checksums")
    p.set_defaults(func=cmd_base_models)

    p = subparsers.add_parser("init-model", help="write an (untrained) model directory for a variant")
    p.add_argument("--variant", default="lite", help="lite | 1b | 7b (see engine/model/variants)")
    p.add_argument("--out", type=Path, required=True, help="model directory to create")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. llm.path=/models/llama-3.2-1b (repeatable)")
    p.set_defaults(func=cmd_init_model)

    p = subparsers.add_parser("caption", help="caption images or rasters (one caption per input)")
    p.add_argument("inputs", nargs="+", type=Path, help="images or rasters (PNG, JPEG, GeoTIFF, VRT, ...)")
    p.add_argument("--style", default="concise", choices=["concise", "detailed"])
    p.add_argument("--json", action="store_true", help="print one JSON object per input (with expert segments)")
    add_region_options(p)
    add_resolution_option(p)
    add_model_options(p)
    p.set_defaults(func=cmd_caption)

    p = subparsers.add_parser("ask", help="ask a question about an image or raster")
    p.add_argument("input", type=Path)
    p.add_argument("question")
    p.add_argument("--json", action="store_true")
    add_region_options(p)
    add_resolution_option(p)
    add_model_options(p)
    p.set_defaults(func=cmd_ask)

    p = subparsers.add_parser("annotate", help="caption every tile of rasters into GeoJSON layers (resumable; "
                                               "many rasters at once, optionally on a Ray cluster)")
    p.add_argument("raster", type=Path, nargs="+",
                   help="the raster to annotate; or several rasters, folders of rasters and list files (.txt: one "
                        "path a line) with --out-dir")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="GeoJSON to write for one raster (its journal lies beside it)")
    where.add_argument("--out-dir", type=Path,
                       help="folder for one GeoJSON per raster (named after it) and index.json, what became of each")
    p.add_argument("--tile-size", default=None,
                   help="tile size in pixels (512) or ground metres (500m, 2km); default: the model's ground "
                        "footprint (resolution.tile_m) for georeferenced rasters fine enough for it, the coarsest "
                        "trained footprint (2560m for Sentinel-2) where 512 px would be seen coarser than the "
                        "trained range, else 512")
    p.add_argument("--overlap", type=int, default=0, help="pixels shared by neighbouring tiles (default 0)")
    add_region_options(p, window_help="annotate only this pixel window col_off,row_off,width,height")
    p.add_argument("--style", default="concise", choices=["concise", "detailed"])
    p.add_argument("--batch-size", type=int, default=None, help="tiles per model call (default 64)")
    p.add_argument("--gpkg", type=Path, default=None, help="also write a GeoPackage (raster CRS) here")
    p.add_argument("--restart", action="store_true", help="ignore an existing journal and start afresh")
    p.add_argument("--min-valid", type=float, default=0.5,
                   help="skip tiles with less valid (not nodata) data than this fraction (default 0.5)")
    p.add_argument("--timing", action="store_true",
                   help="write each tile's seconds into the GeoJSON (runs then differ byte-wise)")
    p.add_argument("--keep-journal", action="store_true", help="keep the journal after success")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="caption on Ray workers (pip install 'rsmoe[distributed]'): --ray or --ray local starts "
                        "Ray on this machine; an address (auto, HOST:6379, ray://HOST:10001) joins a cluster")
    p.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="Ray workers, each loading the model once (default: as many as the CPUs / GPUs allow)")
    p.add_argument("--ray-cpus-per-worker", type=float, default=1.0, metavar="C",
                   help="CPUs each Ray worker reserves, its model's threads (default 1)")
    p.add_argument("--ray-gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="GPUs each Ray worker reserves and runs the model on (default 0; 0.5 shares a GPU)")
    add_model_options(p)
    p.set_defaults(func=cmd_annotate)

    p = subparsers.add_parser("serve", help="run the local HTTP service for the QGIS plugin")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: a free one, written to the token file)")
    p.add_argument("--token-file", type=Path, default=None,
                   help="where to write {url, token, pid} (default $RSMOE_HOME/engine.json or ~/.cache/rsmoe/engine.json)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body in MB (default 64)")
    p.add_argument("--batch-size", type=int, default=None, help="images per model call (default 64)")
    p.add_argument("--stop-on-stdin-eof", action="store_true",
                   help="stop when standard input closes (the QGIS plugin's pipe: the engine ends with QGIS)")
    add_model_options(p)
    p.set_defaults(func=cmd_serve)


def add_region_options(parser: argparse.ArgumentParser,
                       window_help: str = "read only this pixel window col_off,row_off,width,height") -> None:
    """``--window``, ``--extent``, ``--extent-crs``, ``--bands``: which part of a raster to look at."""
    parser.add_argument("--window", default=None, metavar="COL,ROW,W,H", help=window_help)
    parser.add_argument("--extent", default=None, metavar="MINX,MINY,MAXX,MAXY",
                        help="an extent in the raster CRS or --extent-crs (negative numbers: --extent=-77.5,...)")
    parser.add_argument("--extent-crs", default=None, metavar="CRS", help="CRS of --extent, e.g. EPSG:4326")
    parser.add_argument("--bands", default=None, help="bands as R,G,B (4,3,2 or B04,B03,B02) or one band")


def add_resolution_option(parser: argparse.ArgumentParser) -> None:
    """``--ground-resolution``: metres per pixel of an image without georeferencing."""
    parser.add_argument("--ground-resolution", type=float, default=None, metavar="M",
                        help="metres per pixel of the image (default: from its georeferencing, else unknown); "
                             "the model is told the resolution it sees")


def _numbers(text: str | None, what: str, kind: type) -> list | None:
    from engine.errors import UserInputError

    if text is None:
        return None
    try:
        values = [kind(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise UserInputError(f"{what} takes four comma-separated numbers, got {text!r}")
    return values


def _region(args: argparse.Namespace) -> dict:
    """ImageInput keywords from the region options."""
    from engine.bands import BandSelection
    from engine.georef import Window

    window = _numbers(args.window, "--window", int)
    return {"window": Window.from_list(window) if window else None,
            "extent": _numbers(args.extent, "--extent", float), "extent_crs": args.extent_crs,
            "bands": BandSelection.parse(args.bands)}


def cmd_base_models(args: argparse.Namespace) -> int:
    from engine.base_models import run_cli

    return run_cli(force=args.force, verify_only=args.verify, names=args.names or None)


def cmd_init_model(args: argparse.Namespace) -> int:
    from engine.errors import UserInputError
    from engine.model import RSMoEConfig

    config = RSMoEConfig.variant(args.variant).to_dict()
    for item in args.set:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) != 2 or parts[0] not in config or not isinstance(config[parts[0]], dict):
            raise UserInputError(f"--set takes SECTION.KEY=VALUE (e.g. llm.path=DIR), got {item!r}")
        config[parts[0]][parts[1]] = value
    if args.out.exists() and any(args.out.iterdir()):
        raise UserInputError(f"{args.out} exists and is not empty; choose a new directory")
    RSMoEConfig.from_dict(config).save(args.out)
    log.info("wrote %s (untrained %s architecture; train it with `rsmoe train`)", args.out / "config.json", args.variant)
    return 0


def _print_result(path: Path, result, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps({"input": str(path), **result.to_dict()}) + "\n")
    else:
        sys.stdout.write(result.text + "\n")
    sys.stdout.flush()


def _model_config(args: argparse.Namespace):
    """The model directory's config (read before the weights load), or None when it cannot be read yet
    (loading the model then reports why)."""
    from engine.errors import RSMoEError
    from engine.model import RSMoEConfig
    from engine.runtime import default_model_dir

    try:
        return RSMoEConfig.load(Path(args.model) if args.model else default_model_dir())
    except (RSMoEError, OSError, ValueError):
        return None


def _load_pipeline(args: argparse.Namespace, **options):
    from engine.pipeline import Pipeline

    return Pipeline.load(args.model, args.backend, args.device, args.dtype, **options)


def cmd_caption(args: argparse.Namespace) -> int:
    from engine.inputs import ImageInput, check_input

    inputs = [ImageInput(path=str(path), ground_resolution_m=args.ground_resolution, **_region(args))
              for path in args.inputs]
    for inp in inputs:  # every input is checked before the model loads
        check_input(inp)
    pipeline = _load_pipeline(args)
    for path, result in zip(args.inputs, pipeline.caption_batch(inputs, args.style)):
        _print_result(path, result, args.json)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from engine.inputs import ImageInput, check_input
    from engine.pipeline import check_question

    inp = ImageInput(path=str(args.input), ground_resolution_m=args.ground_resolution, **_region(args))
    check_question(args.question)
    check_input(inp)
    pipeline = _load_pipeline(args)
    _print_result(args.input, pipeline.ask(inp, args.question), args.json)
    return 0


def _progress_bar(args: argparse.Namespace) -> tuple[Any, Any]:
    """A tqdm bar over every tile of the job: (progress callback, close)."""
    from tqdm import tqdm

    bars: list = []

    def progress(p) -> None:
        if not bars:
            bars.append(tqdm(total=p.total, initial=p.done, unit="tile", desc="annotating", dynamic_ncols=True,
                             disable=getattr(args, "quiet", False)))
        if bars[0].total != p.total:
            bars[0].total = p.total
        bars[0].update(p.done - bars[0].n)
        bars[0].set_postfix(skipped=p.skipped)

    def close() -> None:
        for bar in bars:
            bar.close()

    return progress, close


@contextmanager
def _captioner(args: argparse.Namespace) -> Iterator[Any]:
    """Who captions the tiles: this process's model, or Ray workers with ``--ray`` (each loading the model)."""
    if args.ray is None:
        from engine.jobs import LocalCaptioner

        yield LocalCaptioner(_load_pipeline(args))
        return
    from engine.distributed import RayCaptioner, RayOptions
    from engine.runtime import ModelSpec

    options = RayOptions(address=args.ray, workers=args.ray_workers, cpus_per_worker=args.ray_cpus_per_worker,
                         gpus_per_worker=args.ray_gpus_per_worker)
    spec = ModelSpec(str(args.model) if args.model else None, args.backend, args.device, args.dtype)
    with RayCaptioner(spec, options) as captioner:
        yield captioner


def cmd_annotate(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from engine.batch import INDEX_NAME, annotate_batch, check_any, expand_rasters, is_many, output_paths
    from engine.errors import UserInputError
    from engine.jobs import AnnotateParams, annotate_rasters, check_annotation

    if args.ray is not None:  # a missing extra or bad Ray option is said before anything else
        from engine.distributed import RayOptions, import_ray

        import_ray()
        RayOptions(address=args.ray, workers=args.ray_workers, cpus_per_worker=args.ray_cpus_per_worker,
                   gpus_per_worker=args.ray_gpus_per_worker)
    region = _region(args)
    options = dict(tile_size=args.tile_size, overlap=args.overlap, window=region["window"], extent=region["extent"],
                   extent_crs=region["extent_crs"], bands=region["bands"], style=args.style,
                   batch_size=args.batch_size, restart=args.restart, min_valid_fraction=args.min_valid,
                   timing=args.timing, keep_journal=args.keep_journal)
    config = _model_config(args)
    if args.out is not None:
        if len(args.raster) > 1 or is_many(args.raster[0]):
            raise UserInputError("several rasters, a folder or a list file need --out-dir DIR (one GeoJSON per "
                                 "raster), not --out")
        jobs = [AnnotateParams(raster=str(args.raster[0]), out=str(args.out),
                               gpkg=str(args.gpkg) if args.gpkg else None, **options)]
        check_annotation(jobs[0], config=config)  # bad raster / extent / tiling / output fail early
        index = None
    else:
        if args.gpkg is not None:
            raise UserInputError("--gpkg names one file: use it with --out (one raster)")
        if args.out_dir.exists() and not args.out_dir.is_dir():
            raise UserInputError(f"--out-dir '{args.out_dir}' is a file; give a folder")
        rasters = expand_rasters(args.raster)
        try:
            args.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserInputError(f"cannot create --out-dir '{args.out_dir}': {exc.strerror or exc}") from None
        jobs = [AnnotateParams(raster=str(r), out=str(o), **options)
                for r, o in zip(rasters, output_paths(rasters, args.out_dir))]
        index = args.out_dir / INDEX_NAME
        check_any(jobs, lambda params: check_annotation(params, config=config), index)
    progress, close_bar = _progress_bar(args)
    try:
        with _captioner(args) as captioner, logging_redirect_tqdm():
            if index is None:
                outcomes = annotate_rasters(jobs, captioner, progress, fail_fast=True)
            else:
                outcomes = annotate_batch(jobs, captioner, index, progress)
    except KeyboardInterrupt:
        log.warning("interrupted: finished tiles are kept in the journals beside the outputs; run the same "
                    "command again to resume")
        raise
    finally:
        close_bar()
    results = [o.result for o in outcomes if o.result is not None]
    if index is None:
        result = results[0]
        resumed = f", {result.resumed} resumed from the journal" if result.resumed else ""
        also = f" and {result.gpkg}" if result.gpkg else ""
        sys.stdout.write(f"wrote {result.out}{also}: {result.total} tiles ({result.captioned} captioned, "
                         f"{result.skipped} skipped{resumed}) in {result.seconds:.1f} s\n")
    else:
        total, skipped = sum(r.total for r in results), sum(r.skipped for r in results)
        resumed = sum(r.resumed for r in results)
        also = f", {resumed} resumed from the journals" if resumed else ""
        sys.stdout.write(f"wrote {len(results)} GeoJSON(s) to {args.out_dir} (index {index}): {total} tiles "
                         f"({total - skipped} captioned, {skipped} skipped{also})\n")
    sys.stdout.flush()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.errors import UserInputError
    from engine.server import EngineService, ServeOptions

    if not args.max_body_mb > 0:
        raise UserInputError("--max-body-mb must be positive")
    options = ServeOptions(host=args.host, port=args.port, token_file=args.token_file,
                           max_body_bytes=int(args.max_body_mb * 2**20),
                           log_level="info" if args.verbose else "warning",
                           stop_on_stdin_eof=args.stop_on_stdin_eof)
    sizing = {"batch_size": args.batch_size} if args.batch_size is not None else {}
    service = EngineService(_load_pipeline(args, **sizing), options)
    sys.stdout.write(f"rsmoe engine serving on {service.url} (token in {service.token_file}); Ctrl+C stops it\n")
    sys.stdout.flush()
    try:
        service.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it handled after a clean shutdown
        pass
    log.info("engine stopped")
    return 0
