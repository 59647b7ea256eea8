"""Many rasters in one annotation job: which rasters (files, folders, list files), one GeoJSON each in an output
folder, and the job's index of what became of every raster.

Rasters
    :func:`expand_rasters` takes raster files, folders (their rasters, by file suffix, sorted by name) and list
    files (``.txt`` / ``.lst``: one path a line, relative to the list's folder; blank lines and ``#`` comments
    skipped). A named raster that is missing or unreadable is not an error of the job: it is reported in the
    index while the others are annotated.

Outputs
    ``DIR/<raster name>.geojson`` (:func:`output_paths`; a name used twice gets ``-2``, ``-3``... in input order),
    each with its journal beside it while it runs, and ``DIR/index.json`` (:func:`write_index`, rewritten
    atomically as rasters finish): per raster ``raster``, ``out``, ``state`` (ok, error, pending), ``error``
    (its one-line message), ``tiles`` and, when done, ``captioned``, ``skipped``, ``resumed``, ``seconds``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Sequence

from engine import __version__
from engine.errors import InputNotFoundError, RastersFailedError, RSMoEError, UserInputError
from engine.jobs import (AnnotateParams, CancelFlag, ProgressCallback, RasterOutcome, TileCaptioner,
                         annotate_rasters)
from engine.outputs import write_json_atomic

log = logging.getLogger(__name__)

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2", ".png", ".jpg", ".jpeg")
LIST_SUFFIXES = (".txt", ".lst")
INDEX_NAME = "index.json"
INDEX_VERSION = 1
#: The index is rewritten at most this often while a job runs (and always at its end).
INDEX_EVERY_S = 2.0


def is_many(item: str | Path) -> bool:
    """Whether a command-line item names several rasters (a folder or a list file)."""
    path = Path(item)
    return path.is_dir() or path.suffix.lower() in LIST_SUFFIXES


def expand_rasters(items: Sequence[str | Path]) -> list[Path]:
    """The rasters named by files, folders and list files, in order (see the module docstring)."""
    rasters: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES)
            if not found:
                raise UserInputError(f"folder '{path}' holds no raster ({', '.join(RASTER_SUFFIXES)})")
            rasters += found
        elif path.suffix.lower() in LIST_SUFFIXES:
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                raise InputNotFoundError(f"list file '{path}' not found") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise UserInputError(f"cannot read list file '{path}': {getattr(exc, 'strerror', None) or exc}") from None
            named = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not named:
                raise UserInputError(f"list file '{path}' names no raster (one path a line)")
            rasters += [path.parent / name for name in named]
        else:
            rasters.append(path)
    return rasters


def output_paths(rasters: Sequence[Path], out_dir: Path) -> list[Path]:
    """``out_dir/<raster stem>.geojson`` per raster; a name used twice gets ``-2``, ``-3``... (input order)."""
    used: set[str] = set()
    outs = []
    for raster in rasters:
        stem = raster.stem or "raster"
        name, n = stem, 2
        while name.lower() in used or name.lower() == Path(INDEX_NAME).stem:
            name, n = f"{stem}-{n}", n + 1
        used.add(name.lower())
        outs.append(out_dir / f"{name}.geojson")
    return outs


def write_index(path: Path, outcomes: Sequence[RasterOutcome], finished: bool) -> Path:
    """Write the job's index (see the module docstring) atomically."""
    entries = [o.to_dict() for o in outcomes]
    index = {"rsmoe_index": INDEX_VERSION, "engine_version": __version__, "finished": finished,
             "rasters_total": len(entries), "ok": sum(e["state"] == "ok" for e in entries),
             "failed": sum(e["state"] == "error" for e in entries), "rasters": entries}
    return write_json_atomic(path, index)


def annotate_batch(jobs: Sequence[AnnotateParams], captioner: TileCaptioner, index: Path,
                   progress: ProgressCallback | None = None, cancel: CancelFlag | None = None) -> list[RasterOutcome]:
    """Annotate rasters with :func:`engine.jobs.annotate_rasters`, keeping ``index`` up to date as they finish.

    Raises
    ------
    RastersFailedError
        Some rasters failed (the others are written; the index names each failure).
    """
    written = [time.monotonic()]

    def on_outcome(_: RasterOutcome, so_far: list[RasterOutcome]) -> None:
        if time.monotonic() - written[0] >= INDEX_EVERY_S:
            write_index(index, so_far, finished=False)
            written[0] = time.monotonic()

    outcomes = [RasterOutcome(params) for params in jobs]
    write_index(index, outcomes, finished=False)
    try:
        outcomes = annotate_rasters(jobs, captioner, progress, cancel, on_outcome=on_outcome)
    finally:
        write_index(index, outcomes, finished=True)
    failed = [o for o in outcomes if o.error is not None]
    if failed:
        first = failed[0]
        raise RastersFailedError(f"{len(failed)} of {len(outcomes)} rasters failed (first: {first.params.raster}: "
                                 f"{first.error}); the others are written; each failure is in {index}")
    return outcomes


def check_any(jobs: Sequence[AnnotateParams], check: Callable[[AnnotateParams], object], index: Path) -> None:
    """Refuse a job none of whose rasters can run (before a model loads), writing the index of why."""
    outcomes = [RasterOutcome(params) for params in jobs]
    for outcome in outcomes:
        try:
            check(outcome.params)
        except RSMoEError as exc:
            outcome.error = exc
        else:
            return
    write_index(index, outcomes, finished=True)
    first = outcomes[0]
    raise RastersFailedError(f"none of the {len(outcomes)} raster(s) can be annotated (first: {first.params.raster}: "
                             f"{first.error}); each failure is in {index}")
