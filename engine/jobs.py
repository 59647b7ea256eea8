"""Batch annotation jobs: caption every tile of a raster into GeoJSON, with progress, cancel and resume.

One run (:func:`run_annotation`; :func:`annotate` takes the raster, tiling and options as arguments)
    The raster (or a window / extent of it) is cut into tiles (:func:`engine.tiling.plan_tiles`) of the
    given size, or of :func:`default_tile_size` (a ground footprint the model knows where its config sets one
    and the raster's pixels allow, else :data:`DEFAULT_TILE_PX` pixels); a tiling whose tiles the model sees
    outside its trained ground resolution range is logged as a warning that names a tile size in metres that
    would be in range.
    Tiles go through the model in fixed groups of ``batch_size`` consecutive tile indices (the
    same groups on every run, so a resumed run feeds the model exactly the batches an
    uninterrupted run does). Tiles with too little valid data are not captioned: their
    features have ``caption: null`` and a ``skipped`` reason.

Many rasters, other captioners
    :func:`annotate_rasters` is the one driver: it checks every raster of a job, opens each in turn
    (:class:`RasterRun`: plan, journal), hands its pending groups to a :class:`TileCaptioner` and journals the
    records as groups complete, in any order; :func:`run_annotation` is its one-raster case with this process's
    pipeline (:class:`LocalCaptioner`). Ray workers are another captioner (:mod:`engine.distributed`) running
    :func:`annotate_group` on the same groups, so their outputs are byte-identical. A raster that fails is
    reported while the others go on (:class:`RasterOutcome`; :mod:`engine.batch` writes the job's index).

Resume
    Every finished tile is appended to the job's journal (``OUT.geojson.journal``,
    :class:`engine.journal.TileJournal`) as its batch completes, durably. Run the same job again after a
    crash, a kill (even SIGKILL) or a cancel and it continues where it stopped; the final GeoJSON is
    built from the journal's records only, so it is byte-identical to an uninterrupted run's. A job
    with other parameters refuses an existing journal unless ``restart`` is given.

Output
    Written only when every tile is done, atomically (:func:`engine.outputs.write_geojson_atomic`): a
    failed or cancelled run leaves any earlier OUT.geojson as it was and never a half-written one.
    Feature properties: ``tile_index``, ``window``, ``caption``, ``skipped``, ``valid_fraction``,
    ``ground_resolution_m`` (native), ``row``, ``col``, ``segments`` (per expert: ``expert``, ``text``),
    ``router``, ``scene`` (``null`` where the model named none), ``scene_confidence`` (the scene head's
    probability for its best scene, or ``null``), ``model_resolution_m`` (metres per pixel of the model
    input), ``uncertain`` and ``uncertainty`` (the reasons; ``null`` for skipped tiles), ``model_id``,
    ``backend`` and, with ``timing``,
    ``seconds`` (the tile's share of its batch's wall time: journalled with the tile, but left out by
    default because it differs between runs). The journal is deleted after a successful run unless ``keep_journal``.

Service
    The service queues jobs and runs them one at a time in a worker thread:
    :class:`engine.job_manager.JobManager`.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from engine.errors import CancelledError, JobError, RSMoEError, UserInputError
from engine import __version__
from engine.bands import BandSelection
from engine.georef import Window
from engine.inputs import ImageInput, open_input, raster_identity, resolve_window, seen_resolution
from engine.journal import TileJournal, journal_path
from engine.model.config import RSMoEConfig
from engine.model.routing import round_resolution
from engine.outputs import TileRecord, feature_collection, write_geojson_atomic, write_gpkg
from engine.pipeline import ModelInfo, Pipeline
from engine.raster import RasterSource
from engine.tiling import Tile, TileSize, TilingParams, parse_tile_size, plan_tiles

log = logging.getLogger(__name__)

#: The tile size when none is given and the model config names no ground footprint (or the raster has no
#: georeferencing, or its pixels are too coarse for that footprint).
DEFAULT_TILE_PX = 512

#: Properties journalled with each tile but written to the GeoJSON only on request (they vary run to run).
VOLATILE_PROPERTIES = ("seconds",)


# --------------------------------------------------------------------------------------------
# Parameters, progress, results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnnotateParams:
    """One batch annotation job.

    Parameters
    ----------
    raster
        Path of the raster to annotate.
    out
        The GeoJSON to write (its folder is created; its journal lies beside it).
    tile_size
        Pixels (``512``, ``"512px"``) or ground metres (``"500m"``, ``"2km"``); None: the model's default
        (:func:`default_tile_size`).
    overlap
        Pixels shared by neighbouring tiles.
    window, extent, extent_crs
        Annotate only a pixel window, or an extent (minx, miny, maxx, maxy) in the raster CRS or
        ``extent_crs``; default: the whole raster.
    bands
        Band choice (``"4,3,2"``, ``"B04,B03,B02"``; default: RGB by colour interpretation, else 1,2,3).
    style
        ``concise`` (one sentence per tile) or ``detailed`` (every expert).
    batch_size
        Tiles per model call (default: the pipeline's).
    gpkg
        Also write a GeoPackage (raster CRS) here.
    restart
        Ignore (and replace) an existing journal instead of resuming it.
    min_valid_fraction
        Tiles with less valid (not nodata) data are skipped.
    timing
        Write each tile's ``seconds`` into the GeoJSON (makes runs differ byte-wise).
    keep_journal
        Keep the journal after success (a re-run then only rewrites the output).
    """

    raster: str
    out: str
    tile_size: str | int | None = None
    overlap: int = 0
    window: Window | None = None
    extent: tuple[float, float, float, float] | None = None
    extent_crs: str | None = None
    bands: BandSelection | str | None = None
    style: str = "concise"
    batch_size: int | None = None
    gpkg: str | None = None
    restart: bool = False
    min_valid_fraction: float = 0.5
    timing: bool = False
    keep_journal: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "raster", str(self.raster))
        object.__setattr__(self, "out", str(self.out))
        if self.gpkg is not None:
            object.__setattr__(self, "gpkg", str(self.gpkg))
        if not isinstance(self.bands, BandSelection):
            object.__setattr__(self, "bands", BandSelection.parse(self.bands))
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise UserInputError(f"batch size must be >= 1, got {self.batch_size}")
        if self.tile_size is not None:
            parse_tile_size(self.tile_size)  # fail early on a malformed size

    def image_input(self) -> ImageInput:
        assert isinstance(self.bands, BandSelection)
        return ImageInput(path=self.raster, window=self.window, extent=self.extent, extent_crs=self.extent_crs,
                          bands=self.bands)


@dataclass
class JobProgress:
    """Tiles done (captioned + skipped, resumed ones included) out of ``total``."""

    done: int
    total: int
    skipped: int
    resumed: int = 0


@dataclass
class AnnotateResult:
    """What a finished annotation wrote."""

    out: Path
    gpkg: Path | None
    total: int
    captioned: int
    skipped: int
    resumed: int
    seconds: float
    journal: Path | None

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "gpkg": str(self.gpkg) if self.gpkg else None, "total": self.total,
                "captioned": self.captioned, "skipped": self.skipped, "resumed": self.resumed,
                "seconds": round(self.seconds, 3), "journal": str(self.journal) if self.journal else None}


ProgressCallback = Callable[[JobProgress], None]


class CancelFlag(Protocol):
    """Anything with ``is_set()`` (a ``threading.Event``)."""

    def is_set(self) -> bool: ...  # pragma: no cover


@dataclass
class AnnotationPlan:
    """A validated job: its tiles, the region, the journal header and the output metadata."""

    params: AnnotateParams
    tiles: list[Any]
    region: Window
    header: dict[str, Any]
    metadata: dict[str, Any]
    tile_size: TileSize | None = None
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Running one job
# --------------------------------------------------------------------------------------------
def _check_params(params: AnnotateParams) -> None:
    if params.style not in ("concise", "detailed"):
        raise UserInputError(f"unknown caption style {params.style!r}; use concise or detailed")
    for label, value in (("--out", params.out), ("--gpkg", params.gpkg)):
        if value is None:
            continue
        path = Path(value)
        try:
            folder = not path.name or path.is_dir()
        except OSError as exc:  # e.g. a name too long for the file system
            raise UserInputError(f"{label} '{value}' is not a usable file name: {exc.strerror or exc}") from None
        if folder:
            raise UserInputError(f"{label} '{value}' is a folder; give a file name such as tiles.geojson")
    if params.gpkg is not None and Path(params.gpkg).resolve() == Path(params.out).resolve():
        raise UserInputError("--gpkg and --out name the same file")
    if Path(params.raster).resolve() in (Path(params.out).resolve(), journal_path(params.out).resolve()):
        raise UserInputError("--out would overwrite the raster itself; choose another output file")


def default_tile_size(source: RasterSource, region: Window, config: RSMoEConfig | None) -> TileSize:
    """The tile size of a job that gives none, so that the model sees its tiles at a resolution it knows.

    ``resolution.tile_m`` metres (a ground footprint the model was trained on) when the model config sets it,
    the raster is georeferenced and its pixels are fine enough for such a tile to fill the model input without
    upsampling (so very fine imagery is read in footprints the model knows instead of fixed pixel tiles that it
    would see far too sharp); else, where :data:`DEFAULT_TILE_PX` pixel tiles would be seen coarser than the
    coarsest trained resolution ``resolution.max_m`` but the pixels themselves are not (Sentinel-2's 10 m),
    tiles of the coarsest trained footprint (``max_m`` x the input size: 2.56 km, 256 px of Sentinel-2);
    else :data:`DEFAULT_TILE_PX` pixels (no model config or georeferencing, pixels coarser than the range)."""
    if config is None:
        return TileSize(DEFAULT_TILE_PX)
    res, image_size = config.resolution, config.image.image_size
    native = source.ground_resolution_of(region) if res.tile_m or res.max_m else None
    if native is None:
        return TileSize(DEFAULT_TILE_PX)
    if res.tile_m and native <= res.tile_m / image_size:
        return TileSize(float(res.tile_m), "m")
    if res.max_m and native <= res.max_m < native * DEFAULT_TILE_PX / image_size:
        return TileSize(float(round(res.max_m * image_size)), "m")
    return TileSize(DEFAULT_TILE_PX)


def tile_resolution_warning(source: RasterSource, region: Window, size: TileSize, tiles: list[Any],
                            config: RSMoEConfig | None) -> str | None:
    """A warning when the model sees a tiling's tiles more than 1.5x outside its trained ground resolution
    range, naming a tile size in metres that would be in range; None when in range or unknown."""
    if config is None or not tiles:
        return None
    res = config.resolution
    image_size = config.image.image_size
    native = source.ground_resolution_of(region)
    first = tiles[0].window
    seen = seen_resolution(native, first.width, first.height, image_size)
    side = res.outside(seen)
    if side is None or native is None or seen is None:
        return None
    low = "?" if res.min_m is None else f"{res.min_m:g}"
    high = "?" if res.max_m is None else f"{res.max_m:g}"
    message = (f"tiles of {size} ({first.width} x {first.height} px at {native:.3g} m/px) are seen by the model at "
               f"{round_resolution(seen):g} m/px, {side} than its trained range {low}-{high} m/px: their "
               f"captions will be marked uncertain")
    if res.max_m is not None and native > res.max_m:
        return message + f"; the raster's own pixels ({native:.3g} m) are coarser than that range"
    # tiles of lo..hi metres are seen in range without being upsampled (at least image_size pixels)
    lo = max(res.min_m or 0.0, native) * image_size
    hi = res.max_m * image_size if res.max_m is not None else None
    if res.tile_m and lo <= res.tile_m and (hi is None or res.tile_m <= hi):
        suggest = float(res.tile_m)
    else:
        suggest = math.sqrt(lo * hi) if hi is not None else lo
    span = f"{_metres(lo)} to {_metres(hi)}" if hi is not None else f"at least {_metres(lo)}"
    return message + f"; tiles of {span} would be in range, e.g. tile size {_metres(suggest)}"


def _metres(value: float) -> str:
    """A ground length as a tile size reads it: ``67.2m``, ``2.69km``."""
    return f"{value:.3g}m" if value < 1000 else f"{value / 1000:.3g}km"


def _plan(source: RasterSource, params: AnnotateParams, info: ModelInfo | None,
          config: RSMoEConfig | None = None) -> AnnotationPlan:
    region = resolve_window(source, params.image_input())
    if params.tile_size is None:
        size = default_tile_size(source, region, config)
        log.info("no tile size given: tiles of %s (the model's default for this raster)", size)
    else:
        size = parse_tile_size(params.tile_size)
    tiles = plan_tiles(source, size, params.overlap, region)
    warning = tile_resolution_warning(source, region, size, tiles, config)
    tiling = TilingParams(size, params.overlap, region)
    model = {"id": info.model_id, "fingerprint": info.fingerprint, "backend": info.backend} if info else None
    header = {
        "raster": raster_identity(params.raster),
        "size": [source.width, source.height],
        "bands": list(source.band_indices),
        "tiling": tiling.to_dict(),
        "tiles": len(tiles),
        "style": params.style,
        "min_valid_fraction": params.min_valid_fraction,
        "model": model,
    }
    metadata = {
        "raster": params.raster,
        "bands": list(source.band_indices),
        "tiling": tiling.to_dict(),
        "style": params.style,
        "model_id": info.model_id if info else None,
        "model_variant": info.variant if info else None,
        "model_trained": info.trained if info else None,
        "backend": info.backend if info else None,
        "engine_version": __version__,
    }
    return AnnotationPlan(params, tiles, region, header, metadata, size, [warning] if warning else [])


def check_annotation(params: AnnotateParams, info: ModelInfo | None = None,
                     config: RSMoEConfig | None = None) -> AnnotationPlan:
    """Validate a job without running it (no model needed): the raster opens, region and tiling are
    valid, the outputs are file names. Raises the error the run would raise. Without the model's
    ``config`` a job without a tile size is checked with :data:`DEFAULT_TILE_PX` pixels."""
    _check_params(params)
    quiet = [logging.getLogger(name) for name in ("engine.tiling", __name__)]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(max(logging.WARNING, lg.getEffectiveLevel()))  # the run logs the plan itself
    try:
        with open_input(params.image_input(), params.min_valid_fraction) as (source, _):
            return _plan(source, params, info, config)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


def _groups(tiles: list[Tile], size: int) -> list[list[Tile]]:
    return [tiles[i:i + size] for i in range(0, len(tiles), size)]


class RasterRun:
    """One raster's job while it runs: the open raster, its plan, its journal and what is done.

    :meth:`open` plans the job and opens (or resumes) its journal; :meth:`pending` gives the fixed tile groups
    still to caption; :meth:`add` journals a group's records (groups may complete in any order);
    :meth:`finish` writes the outputs from the journal once every tile is done. :func:`annotate_rasters`
    drives it.
    """

    def __init__(self, params: AnnotateParams, source: RasterSource, identity: str, plan: AnnotationPlan,
                 journal: TileJournal, done: dict[int, TileRecord], batch_size: int, start: float,
                 resources: ExitStack) -> None:
        self.params, self.source, self.identity, self.plan, self.journal = params, source, identity, plan, journal
        self.batch_size = batch_size
        self.start = start
        self.finished = set(done)
        self.resumed = len(done)
        self.skipped = sum(1 for r in done.values() if r.skipped)
        self._resources = resources

    @classmethod
    def open(cls, params: AnnotateParams, info: ModelInfo | None, config: RSMoEConfig | None,
             batch_size: int) -> RasterRun:
        """Open the raster, plan its tiles and start or resume its journal (raises what a bad job raises)."""
        start = time.perf_counter()
        _check_params(params)
        out = Path(params.out)
        with ExitStack() as stack:
            source, identity = stack.enter_context(open_input(params.image_input(), params.min_valid_fraction))
            plan = _plan(source, params, info, config)
            for warning in plan.warnings:
                log.warning("%s", warning)
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserInputError(f"cannot create the folder of '{out}': {exc.strerror or exc}") from None
            journal = TileJournal.for_output(out, plan.header)
            try:
                done = journal.open(resume=not params.restart)
            except JobError as exc:
                if journal.path.exists() and not _journal_has_tiles(journal):
                    log.info("replacing journal %s of another job that finished no tile", journal.path)
                    done = journal.open(resume=False)
                else:
                    raise JobError(f"{exc} (or run with --restart / \"restart\": true)") from None
            stack.callback(journal.close)
            return cls(params, source, identity, plan, journal, done, batch_size, start, stack.pop_all())

    @property
    def total(self) -> int:
        return len(self.plan.tiles)

    @property
    def complete(self) -> bool:
        return len(self.finished) == self.total

    def pending(self) -> list[list[Tile]]:
        """The fixed groups of ``batch_size`` consecutive tiles (the same on every run) not yet all done."""
        return [g for g in _groups(self.plan.tiles, self.batch_size) if not all(t.index in self.finished for t in g)]

    def add(self, records: list[TileRecord]) -> tuple[int, int]:
        """Journal a group's records durably; returns (tiles newly done, of which skipped)."""
        new = skipped = 0
        for rec in records:
            if rec.tile_index not in self.finished:
                self.journal.append(rec)
                self.finished.add(rec.tile_index)
                new += 1
                skipped += rec.skipped is not None
        self.skipped += skipped
        return new, skipped

    def finish(self) -> AnnotateResult:
        """Write the GeoJSON (and GeoPackage) from the journal's records, atomically; close the run."""
        params = self.params
        records = list(self.journal.records().values())
        if len(records) != self.total:  # pragma: no cover - guarded by the driver
            raise JobError(f"journal '{self.journal.path}' holds {len(records)} of {self.total} tiles")
        try:
            written = [_for_output(r, params.timing) for r in records]
            write_geojson_atomic(params.out, feature_collection(written, self.source.georef, self.plan.metadata))
            gpkg = write_gpkg(params.gpkg, written, self.source.georef) if params.gpkg else None
        finally:
            self.close()
        if not params.keep_journal:
            self.journal.remove()
        skipped = sum(1 for r in records if r.skipped)
        return AnnotateResult(Path(params.out), Path(gpkg) if gpkg else None, self.total, self.total - skipped,
                              skipped, self.resumed, time.perf_counter() - self.start,
                              self.journal.path if params.keep_journal else None)

    def close(self) -> None:
        """Close the journal and the raster (finished tiles stay journalled)."""
        self._resources.close()


Work = Iterator[tuple[RasterRun, list[Tile]]]


class TileCaptioner(Protocol):
    """What captions tile groups for :func:`annotate_rasters`: :class:`LocalCaptioner` (this process's pipeline)
    or :class:`engine.distributed.RayCaptioner` (Ray workers, one model each)."""

    info: ModelInfo
    config: RSMoEConfig | None
    batch_size: int

    def caption_groups(self, work: Work) -> Iterator[tuple[RasterRun, list[TileRecord] | RSMoEError]]:
        """Caption each (run, group) pulled from ``work``; yield (run, its records, or the error a person can fix)
        as groups complete, in any order."""
        ...  # pragma: no cover


class LocalCaptioner:
    """Captions tile groups one after the other with this process's pipeline."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.info = pipeline.info
        self.config: RSMoEConfig | None = pipeline.model.config
        self.batch_size = pipeline.batch_size

    def caption_groups(self, work: Work) -> Iterator[tuple[RasterRun, list[TileRecord] | RSMoEError]]:
        for run, group in work:
            try:
                records = annotate_group(self.pipeline, run.source, run.identity, group, run.params.style)
            except RSMoEError as exc:
                yield run, exc
            else:
                yield run, records


@dataclass
class RasterOutcome:
    """What became of one raster of a job: its result, or the error that stopped it."""

    params: AnnotateParams
    tiles: int | None = None
    result: AnnotateResult | None = None
    error: RSMoEError | None = None

    @property
    def ok(self) -> bool:
        return self.result is not None

    def to_dict(self) -> dict[str, Any]:
        """An entry of a job's index: raster, out, state (ok / error), error, tiles and the result's counts."""
        state = "ok" if self.ok else "error" if self.error is not None else "pending"
        entry: dict[str, Any] = {"raster": self.params.raster, "out": self.params.out, "state": state,
                                 "error": None if self.error is None else str(self.error), "tiles": self.tiles}
        if self.result is not None:
            counts = self.result.to_dict()
            entry.update({k: counts[k] for k in ("captioned", "skipped", "resumed", "seconds")})
        return entry


def annotate_rasters(jobs: Sequence[AnnotateParams], captioner: TileCaptioner,
                     progress: ProgressCallback | None = None, cancel: CancelFlag | None = None,
                     fail_fast: bool = False,
                     on_outcome: Callable[[RasterOutcome, list[RasterOutcome]], None] | None = None
                     ) -> list[RasterOutcome]:
    """Annotate rasters (see the module docstring): every raster is checked, then its pending tile groups go to
    ``captioner`` raster by raster and its records are journalled as they arrive; a raster's outputs are written
    when its last tile is done. ``progress`` covers every raster. A raster that fails (unreadable, bad region,
    a journal of another job) is reported in its outcome while the others go on, unless ``fail_fast`` (then its
    error is raised); ``on_outcome(outcome, outcomes)`` hears of each raster as it ends.

    Raises
    ------
    CancelledError
        ``cancel`` was set; finished tiles stay in the journals, no further output is written.
    """
    outcomes = [RasterOutcome(params) for params in jobs]
    state = JobProgress(0, 0, 0, 0)
    runs: dict[int, tuple[RasterOutcome, RasterRun]] = {}

    def report() -> None:
        if progress:
            progress(replace(state))

    def fail(outcome: RasterOutcome, exc: RSMoEError, run: RasterRun | None = None) -> None:
        if run is not None:
            runs.pop(id(run), None)
            run.close()
            state.total -= run.total - len(run.finished)  # the bar ends at what could be done
        if fail_fast:
            raise exc
        outcome.error = exc
        log.error("%s: %s", outcome.params.raster, exc)
        if on_outcome:
            on_outcome(outcome, outcomes)

    def complete(outcome: RasterOutcome, run: RasterRun) -> None:
        runs.pop(id(run), None)
        try:
            outcome.result = run.finish()
        except RSMoEError as exc:
            fail(outcome, exc)
        else:
            if on_outcome:
                on_outcome(outcome, outcomes)

    def work() -> Work:
        for outcome in outcomes:
            if outcome.error is not None:
                continue
            params = outcome.params
            try:
                run = RasterRun.open(params, captioner.info, captioner.config,
                                     int(params.batch_size or captioner.batch_size))
            except RSMoEError as exc:
                state.total -= outcome.tiles or 0
                fail(outcome, exc)
                continue
            runs[id(run)] = (outcome, run)
            state.total += run.total - (outcome.tiles or 0)
            state.done += len(run.finished)
            state.skipped += run.skipped
            state.resumed += run.resumed
            report()
            groups = run.pending()
            if not groups:
                complete(outcome, run)
            for group in groups:
                if cancel is not None and cancel.is_set():
                    kept = f"the journal '{run.journal.path}' keeps them" if len(outcomes) == 1 else "the journals keep them"
                    raise CancelledError(f"cancelled after {state.done} of {state.total} tiles; {kept}: "
                                         f"run the same job again to resume")
                if id(run) not in runs:  # failed meanwhile
                    break
                yield run, group

    for outcome in outcomes:  # every raster is checked before any model work
        try:
            outcome.tiles = len(check_annotation(outcome.params, captioner.info, captioner.config).tiles)
        except RSMoEError as exc:
            fail(outcome, exc)
        else:
            state.total += outcome.tiles
    try:
        for run, result in captioner.caption_groups(work()):
            entry = runs.get(id(run))
            if entry is None:  # a late group of a raster that failed
                continue
            outcome = entry[0]
            if isinstance(result, RSMoEError):
                fail(outcome, result, run)
                continue
            new, skipped = run.add(result)
            state.done += new
            state.skipped += skipped
            report()
            if run.complete:
                complete(outcome, run)
    finally:
        for _, run in runs.values():
            run.close()
    return outcomes


def run_annotation(pipeline: Pipeline, params: AnnotateParams, progress: ProgressCallback | None = None,
                   cancel: CancelFlag | None = None) -> AnnotateResult:
    """Run (or resume) one annotation job with ``pipeline`` and write its GeoJSON (see the module docstring).

    Raises
    ------
    CancelledError
        ``cancel`` was set; finished tiles stay in the journal, no output is written.
    RSMoEError
        Bad input (raster, extent, tiling, output path) or a journal of another job.
    """
    (outcome,) = annotate_rasters([params], LocalCaptioner(pipeline), progress, cancel, fail_fast=True)
    assert outcome.result is not None
    return outcome.result


def annotate(pipeline: Pipeline, raster: str | Path, tiling: str | int | TilingParams | None = None,
             out: str | Path = "annotations.geojson", progress: ProgressCallback | None = None,
             cancel: CancelFlag | None = None, **options: Any) -> AnnotateResult:
    """Caption every tile of a raster into a GeoJSON file with ``pipeline`` (see :func:`run_annotation`).

    ``tiling`` is a tile size (``512``, ``"500m"``; None: the model's default, see
    :func:`default_tile_size`) or an :class:`engine.tiling.TilingParams`;
    ``options`` are further :class:`AnnotateParams` fields.
    """
    if isinstance(tiling, TilingParams):
        options.setdefault("overlap", tiling.overlap)
        if tiling.extent is not None:
            options.setdefault("window", tiling.extent)
        tiling = str(tiling.tile_size)
    params = AnnotateParams(raster=str(raster), out=str(out), tile_size=tiling, **options)
    return run_annotation(pipeline, params, progress=progress, cancel=cancel)


def _journal_has_tiles(journal: TileJournal) -> bool:
    try:
        return bool(journal.load()[1])
    except JobError:  # unreadable or corrupt: keep it, let the user decide
        return True


def _for_output(record: TileRecord, timing: bool) -> TileRecord:
    """The record as the output shows it: extra keys sorted (records loaded from a journal and records
    appended in this run agree), volatile ones only with ``timing``."""
    keep = {k: record.extra[k] for k in sorted(record.extra) if timing or k not in VOLATILE_PROPERTIES}
    return replace(record, extra=keep)


def annotate_group(pipeline: Pipeline, source: RasterSource, identity: str, group: list[Any],
                   style: str) -> list[TileRecord]:
    """Read a group of tiles, caption the valid ones in one batch, return one record per tile (what every
    captioner, local or a Ray worker, runs on a group)."""
    start = time.perf_counter()
    size = pipeline.image_size
    reads = [source.read_tile(tile.window, size) for tile in group]
    valid = [i for i, r in enumerate(reads) if r.image is not None]
    bands = tuple(source.band_indices)
    natives = [source.ground_resolution_of(tile.window) for tile in group]
    results = {}
    if valid:
        keys = [(identity, tuple(reads[i].window.to_list()), bands, (size, size)) for i in valid]
        seen = [seen_resolution(natives[i], reads[i].window.width, reads[i].window.height, size) for i in valid]
        captions = pipeline.caption_images([reads[i].image for i in valid], style, keys, seen)
        results = dict(zip(valid, captions))
    seconds = round((time.perf_counter() - start) / max(1, len(valid)), 3)
    info = pipeline.info
    records = []
    for i, (tile, read) in enumerate(zip(group, reads)):
        extra: dict[str, Any] = {"row": tile.row, "col": tile.col}
        res = results.get(i)
        if res is not None:
            extra.update(segments=[{"expert": s.expert, "text": s.text} for s in res.segments],
                         router=res.router, scene=res.plan.scene, scene_confidence=res.scene_confidence,
                         model_resolution_m=res.model_resolution_m, uncertain=res.uncertain,
                         uncertainty=list(res.uncertainty))
        else:
            extra.update(segments=None, router=None, scene=None, scene_confidence=None, model_resolution_m=None,
                         uncertain=None, uncertainty=None)
        extra.update(model_id=info.model_id, backend=info.backend)
        if res is not None:
            extra["seconds"] = seconds
        records.append(TileRecord.from_read(tile.index, read, res.text if res is not None else None,
                                            natives[i], **extra))
    return records
