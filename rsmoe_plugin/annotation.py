"""Batch tile annotation: every tile of a layer captioned into a GeoJSON file.

Two ways, one output schema (:mod:`rsmoe_plugin.features`):

* :func:`annotate_file`: a local raster the engine opens itself becomes an engine job
  (``POST /jobs``), polled for progress; cancelling asks the engine to stop
  (``POST /jobs/{id}/cancel``), waits until it has, and removes the job's resume journal, so
  nothing is left at the output. The engine writes the GeoJSON atomically on success only.
* :func:`annotate_rendered`: any other layer is tiled here, every tile rendered by QGIS and sent
  as PNG; the engine's model batch of tiles goes in one ``POST /caption/batch`` (an older engine gets
  ``POST /caption`` per tile); the GeoJSON is written atomically once every tile is done.

Both report through a :class:`QgsFeedback` (a Processing feedback or a task's) and raise
:class:`~rsmoe_plugin.errors.CancelledByUser` when cancelled.

A tile size of 0 means the engine's default: for an engine job the engine chooses (the model's ground
footprint, ``resolution.tile_m`` metres, on georeferenced rasters fine enough for it; the coarsest trained
footprint where 512 px tiles would be seen coarser than the trained range but the pixels are not; else 512 px); for
rendered tiles :func:`default_rendered_tile` applies the same rule with the facts of ``GET /health``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgis.core import Qgis, QgsCoordinateReferenceSystem, QgsFeedback, QgsRasterLayer, QgsRectangle

from rsmoe_plugin.client import ModelAnswer
from rsmoe_plugin.engine_manager import EngineManager, log
from rsmoe_plugin.errors import BadLayerError, CancelledByUser, EngineRequestError
from rsmoe_plugin.features import (
    feature,
    feature_collection,
    footprint_wgs84,
    ground_resolution_m,
    skip_reason,
    tile_properties,
    write_geojson_atomic,
)
from rsmoe_plugin.rendering import png_base64, render_image, valid_fraction
from rsmoe_plugin.tiling import RenderGrid, native_resolution

STYLES = ("concise", "detailed")
POLL_INTERVAL_S = 0.4
DEFAULT_TILE_PX = 512  # the engine's default without a model footprint
MAX_BATCH_ITEMS = 64  # the engine's most items per POST /caption/batch
BATCH_BYTES = 16 * 2**20  # base64 per batch request, well within the engine's body limit (64 MB by default)


@dataclass(frozen=True)
class AnnotateParameters:
    """How to tile and caption.

    Parameters
    ----------
    tile_size, overlap
        Pixels (of the file, or of the rendering at ``resolution``); tile size 0: the engine's default
        (see the module docstring).
    style
        ``concise`` (one sentence per tile) or ``detailed`` (every expert).
    resolution
        Rendered layers only: map units (layer CRS) per pixel; 0 = the layer's own resolution.
    min_valid_fraction
        Tiles with less data than this are kept as features with a ``skipped`` reason.
    """

    tile_size: int = 0
    overlap: int = 0
    style: str = "concise"
    resolution: float = 0.0
    min_valid_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise BadLayerError(f"unknown caption style {self.style!r}; use concise or detailed")
        if int(self.tile_size) < 0:
            raise BadLayerError(f"the tile size must be at least 1 pixel (or 0: the default), got {self.tile_size}")
        if int(self.overlap) < 0 or (self.tile_size and int(self.overlap) >= int(self.tile_size)):
            raise BadLayerError(f"the overlap must lie in 0 .. tile size - 1 ({int(self.tile_size) - 1}), "
                                f"got {self.overlap}")


@dataclass(frozen=True)
class AnnotateOutcome:
    """What a finished run wrote."""

    out: Path
    total: int
    captioned: int
    skipped: int
    seconds: float
    how: str

    def summary(self) -> str:
        return (f"{self.total} tiles ({self.captioned} captioned, {self.skipped} skipped) in {self.seconds:.1f} s, "
                f"{self.how}; wrote {self.out}")


def _info(feedback: QgsFeedback | None, message: str) -> None:
    if feedback is not None and hasattr(feedback, "pushInfo"):
        feedback.pushInfo(message)
    log(message)


def _warn(feedback: QgsFeedback | None, message: str) -> None:
    if feedback is not None and hasattr(feedback, "pushWarning"):
        feedback.pushWarning(message)
    elif feedback is not None and hasattr(feedback, "pushInfo"):
        feedback.pushInfo(message)
    log(message, Qgis.Warning)


def _cancelled(feedback: QgsFeedback | None) -> bool:
    return feedback is not None and feedback.isCanceled()


def journal_of(out: Path) -> Path:
    """The engine's resume journal beside an output (``OUT.geojson.journal``)."""
    return Path(str(out) + ".journal")


# --------------------------------------------------------------------------------------------
# A file the engine reads: an engine job
# --------------------------------------------------------------------------------------------
def annotate_file(manager: EngineManager, path: str, out: str | Path, params: AnnotateParameters,
                  extent: QgsRectangle | None = None, bands: list[int] | None = None,
                  feedback: QgsFeedback | None = None) -> AnnotateOutcome:
    """Run an engine job over ``path`` (``extent`` in the raster's CRS) and wait for it."""
    start = time.monotonic()
    out = Path(out).resolve()
    body: dict[str, Any] = {"path": path, "out": str(out), "overlap": int(params.overlap), "style": params.style,
                            "min_valid_fraction": params.min_valid_fraction}
    if params.tile_size:
        body["tile_size"] = int(params.tile_size)  # else the engine's default for this raster and model
    if extent is not None:
        body["extent"] = [extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()]
    if bands:
        body["bands"] = list(bands)
    status = manager.call(lambda c: c.submit_job(body), "the annotation job")
    size = status.get("tile_size") or f"{params.tile_size}px"  # older engines do not say
    _info(feedback, f"engine job {status['id']}: {status['total']} tiles of {size} from {path}")
    for warning in status.get("warnings") or []:
        _warn(feedback, f"RS-MoE: {warning}")
    restarted = False
    while True:
        if _cancelled(feedback):
            _cancel_job(manager, status, out, feedback)
        time.sleep(POLL_INTERVAL_S)
        job_id = status["id"]
        status = manager.call(lambda c, job_id=job_id: c.job(job_id), "the annotation job")
        if feedback is not None and status.get("total"):
            feedback.setProgress(100.0 * status["done"] / status["total"])
        state = status["state"]
        if state == "done":
            break
        if state == "failed":
            error = str(status.get("error") or status.get("message"))
            if "journal" in error and "restart" in error and not restarted:
                _info(feedback, f"an unfinished run of another job left {journal_of(out)}: starting afresh")
                restarted = True
                status = manager.call(lambda c: c.submit_job({**body, "restart": True}), "the annotation job")
                continue
            raise EngineRequestError(500, f"the annotation job failed: {error}")
        if state == "cancelled":
            journal_of(out).unlink(missing_ok=True)
            raise CancelledByUser(f"the annotation job was cancelled in the engine after {status['done']} of "
                                  f"{status['total']} tiles; nothing was written")
    result = status.get("result") or {}
    if feedback is not None:
        feedback.setProgress(100.0)
    return AnnotateOutcome(out=out, total=int(result.get("total", status["total"])),
                           captioned=int(result.get("captioned", status["total"] - status["skipped"])),
                           skipped=int(result.get("skipped", status["skipped"])),
                           seconds=time.monotonic() - start, how="tiles read by the engine from the file")


def _cancel_job(manager: EngineManager, status: dict[str, Any], out: Path, feedback: QgsFeedback | None) -> None:
    job_id = status["id"]
    _info(feedback, f"cancelling engine job {job_id} (it stops after its current batch of tiles)")
    status = manager.call(lambda c: c.cancel_job(job_id), "cancelling the annotation job")
    deadline = time.monotonic() + manager.settings().request_timeout_s
    while status["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
        status = manager.call(lambda c: c.job(job_id), "cancelling the annotation job")
    journal_of(out).unlink(missing_ok=True)  # no leftovers next to the output
    if status["state"] == "done":  # its last batch was under way when the cancel came: the output is complete
        raise CancelledByUser(f"cancelled, but the engine job had finished its last batch: all {status['total']} "
                              f"tiles were written to {out}")
    raise CancelledByUser(f"cancelled after {status['done']} of {status['total']} tiles; nothing was written to "
                          f"{out}")


# --------------------------------------------------------------------------------------------
# Any other layer: rendered tiles
# --------------------------------------------------------------------------------------------
def annotate_rendered(manager: EngineManager, layer: QgsRasterLayer, crs: QgsCoordinateReferenceSystem,
                      extent: QgsRectangle, out: str | Path, params: AnnotateParameters,
                      feedback: QgsFeedback | None = None, source_label: str | None = None) -> AnnotateOutcome:
    """Tile ``extent`` (layer CRS) of a layer QGIS draws, caption every rendered tile, write GeoJSON.

    ``layer`` should be a clone made in the main thread when this runs in a worker thread.
    """
    start = time.monotonic()
    out = Path(out).resolve()
    resolution = params.resolution or native_resolution(layer)
    if not resolution:
        resolution = max(extent.width(), extent.height()) / 1024.0
        _info(feedback, f"layer '{layer.name()}' has no native resolution: rendering at {resolution:.6g} map "
                        f"units per pixel (1024 px across); set RESOLUTION to choose")
    grid = RenderGrid.of(extent, resolution)
    health = manager.health()
    pixel_m = ground_resolution_m(extent, crs, resolution)
    tile_size, tile_label = int(params.tile_size), f"{int(params.tile_size)}px"
    if not tile_size:
        tile_size, tile_label = default_rendered_tile(health.raw, pixel_m)
    if int(params.overlap) >= tile_size:
        raise BadLayerError(f"the overlap must lie in 0 .. tile size - 1 ({tile_size - 1}), got {params.overlap}")
    tiles = grid.tiles(tile_size, int(params.overlap))
    shown = tile_label if tile_label.endswith("px") else f"{tile_label} ({tile_size} px)"
    _info(feedback, f"{len(tiles)} tiles of {shown} rendered by QGIS from '{layer.name()}' "
                    f"({grid.width} x {grid.height} px at {resolution:.6g} units/px); engine: {health.summary()}")
    warning = rendered_tile_warning(health.raw, pixel_m, tile_size, tile_label)
    if warning:
        _warn(feedback, f"RS-MoE: {warning}")
    per_request = max(1, min(int(health.raw.get("batch_size") or 1), MAX_BATCH_ITEMS))
    rendered: list[_RenderedTile] = []
    pending: list[_RenderedTile] = []

    def send_pending() -> None:  # one POST /caption/batch: the engine captions them in one model batch
        bodies = [t.body for t in pending]
        what = f"tiles {pending[0].tile.index}-{pending[-1].tile.index}"
        answers = manager.call(lambda c: c.caption_batch(bodies, params.style), what)
        for t, answer in zip(pending, answers):
            t.answer = answer
        pending.clear()

    for i, tile in enumerate(tiles):
        if _cancelled(feedback):
            raise CancelledByUser(f"cancelled after {i - len(pending)} of {len(tiles)} tiles; nothing was written "
                                  f"to {out}")
        tile_extent = grid.tile_extent(tile.window)
        image = render_image(layer, tile_extent, crs, tile.window.width, tile.window.height)
        valid = valid_fraction(image)
        current = _RenderedTile(tile, tile_extent, valid, ground_resolution_m(tile_extent, crs, resolution))
        if valid == 0.0 or valid < params.min_valid_fraction:
            current.reason = skip_reason(valid, params.min_valid_fraction)
        else:
            current.body = {"image_base64": png_base64(image)}
            if current.ground_m is not None:  # the PNG has no georeferencing: tell the engine its metres per pixel
                current.body["ground_resolution_m"] = current.ground_m
            pending.append(current)
        rendered.append(current)
        pending_bytes = sum(len(t.body["image_base64"]) for t in pending if t.body)
        if pending and (len(pending) >= per_request or pending_bytes >= BATCH_BYTES or i == len(tiles) - 1):
            send_pending()
        if feedback is not None:
            feedback.setProgress(100.0 * (i + 1 - len(pending)) / len(tiles))
    features = []
    for t in rendered:
        props = tile_properties(t.tile.index, t.tile.window, t.tile.row, t.tile.col, t.answer, t.reason,
                                round(t.valid, 6), t.ground_m, health.model_id, health.backend)
        features.append(feature(t.tile.index, footprint_wgs84(t.extent, crs), props))
    captioned = sum(t.answer is not None for t in rendered)
    skipped = len(rendered) - captioned
    if _cancelled(feedback):
        raise CancelledByUser(f"cancelled after {len(tiles)} of {len(tiles)} tiles; nothing was written to {out}")
    info = {
        "georeferenced": True, "coordinate_space": "EPSG:4326", "source_crs": crs.authid() or crs.toWkt(),
        "raster_size": [grid.width, grid.height], "raster": source_label or layer.source(), "bands": None,
        "tiling": {"tile_size": tile_label, "overlap": int(params.overlap),
                   "extent": [0, 0, grid.width, grid.height]},
        "style": params.style, "model_id": health.model_id, "model_variant": health.variant,
        "model_trained": health.trained, "backend": health.backend, "engine_version": health.version,
        "rendered_by": "qgis", "render_extent": [extent.xMinimum(), extent.yMinimum(), extent.xMaximum(),
                                                 extent.yMaximum()],
        "render_resolution": resolution,
    }
    write_geojson_atomic(out, feature_collection(features, info))
    return AnnotateOutcome(out=out, total=len(tiles), captioned=captioned, skipped=skipped,
                           seconds=time.monotonic() - start, how="tiles rendered by QGIS")


@dataclass
class _RenderedTile:
    """A tile rendered by QGIS: its footprint, data fraction and metres per pixel; then its answer or why not."""

    tile: Any
    extent: QgsRectangle
    valid: float
    ground_m: float | None
    reason: str | None = None
    body: dict[str, Any] | None = None
    answer: ModelAnswer | None = None


def _range(health: dict[str, Any]) -> tuple[dict[str, Any], int]:
    resolution = health.get("resolution")
    image_size = health.get("image_size")
    if not isinstance(resolution, dict) or not isinstance(image_size, int) or image_size < 1:
        return {}, 0  # an older engine: no trained range known
    return resolution, image_size


def default_rendered_tile(health: dict[str, Any], pixel_m: float | None) -> tuple[int, str]:
    """(pixels, label) of a rendered tile when the user gave no tile size (the engine's rule,
    ``engine.jobs.default_tile_size``): the model's ground footprint (``tile_m`` metres) when the engine reports
    one and the rendering's pixels (``pixel_m`` metres) are fine enough for it to fill the model input; else,
    where :data:`DEFAULT_TILE_PX` pixel tiles would be seen coarser than the coarsest trained resolution
    (``max_m``) but the pixels are not, the coarsest trained footprint (``max_m`` x the input size); else
    :data:`DEFAULT_TILE_PX` pixels."""
    resolution, image_size = _range(health)
    tile_m, max_m = resolution.get("tile_m"), resolution.get("max_m")
    if not pixel_m:
        return DEFAULT_TILE_PX, f"{DEFAULT_TILE_PX}px"
    if isinstance(tile_m, (int, float)) and tile_m > 0 and pixel_m <= tile_m / image_size:
        return max(1, round(tile_m / pixel_m)), f"{tile_m:g}m"
    if isinstance(max_m, (int, float)) and pixel_m <= max_m < pixel_m * DEFAULT_TILE_PX / image_size:
        metres = round(max_m * image_size)
        return max(1, round(metres / pixel_m)), f"{metres:g}m"
    return DEFAULT_TILE_PX, f"{DEFAULT_TILE_PX}px"


def rendered_tile_warning(health: dict[str, Any], pixel_m: float | None, tile_px: int, label: str) -> str | None:
    """A warning when the model sees rendered tiles of ``tile_px`` pixels more than 1.5x outside its trained
    range (as the engine warns for its jobs), naming a tile size in metres that would be in range."""
    resolution, image_size = _range(health)
    low, high = resolution.get("min_m"), resolution.get("max_m")
    if not pixel_m or (low is None and high is None):
        return None
    seen = pixel_m * tile_px / image_size
    if low is not None and seen < low / 1.5:
        side = "finer"
    elif high is not None and seen > high * 1.5:
        side = "coarser"
    else:
        return None
    message = (f"tiles of {label} ({pixel_m:.3g} m per rendered pixel) are seen by the model at {seen:.3g} m/px, "
               f"{side} than its trained range {_g(low)}-{_g(high)} m/px: their captions will be marked uncertain")
    if high is not None and pixel_m > high:
        return message + "; set RESOLUTION finer (or use a finer layer)"
    lo_m = max(low or 0.0, pixel_m) * image_size
    if high is not None:
        span = (f"{_metres(lo_m)} to {_metres(high * image_size)} ({round(lo_m / pixel_m)} to "
                f"{round(high * image_size / pixel_m)} px here)")
    else:
        span = f"at least {_metres(lo_m)} ({round(lo_m / pixel_m)} px here)"
    return message + f"; tiles of {span} would be in range"


def _g(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def _metres(value: float) -> str:
    return f"{value:.3g}m" if value < 1000 else f"{value / 1000:.3g}km"
