"""Batch tile annotation: every tile of a layer captioned into a GeoJSON file.

Two ways, one output schema (:mod:`rsmoe_plugin.features`):

* :func:`annotate_file`: a local raster the engine opens itself becomes an engine job
  (``POST /jobs``), polled for progress; cancelling asks the engine to stop
  (``POST /jobs/{id}/cancel``), waits until it has, and removes the job's resume journal, so
  nothing is left at the output. The engine writes the GeoJSON atomically on success only.
* :func:`annotate_rendered`: any other layer is tiled here, every tile rendered by QGIS and sent
  as PNG to ``POST /caption``; the GeoJSON is written atomically once every tile is done.

Both report through a :class:`QgsFeedback` (a Processing feedback or a task's) and raise
:class:`~rsmoe_plugin.errors.CancelledByUser` when cancelled.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgis.core import QgsCoordinateReferenceSystem, QgsFeedback, QgsRasterLayer, QgsRectangle

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


@dataclass(frozen=True)
class AnnotateParameters:
    """How to tile and caption.

    Parameters
    ----------
    tile_size, overlap
        Pixels (of the file, or of the rendering at ``resolution``).
    style
        ``concise`` (one sentence per tile) or ``detailed`` (every expert).
    resolution
        Rendered layers only: map units (layer CRS) per pixel; 0 = the layer's own resolution.
    min_valid_fraction
        Tiles with less data than this are kept as features with a ``skipped`` reason.
    """

    tile_size: int = 512
    overlap: int = 0
    style: str = "concise"
    resolution: float = 0.0
    min_valid_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise BadLayerError(f"unknown caption style {self.style!r}; use concise or detailed")
        if int(self.tile_size) < 1:
            raise BadLayerError(f"the tile size must be at least 1 pixel, got {self.tile_size}")
        if not 0 <= int(self.overlap) < int(self.tile_size):
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
    body: dict[str, Any] = {"path": path, "out": str(out), "tile_size": int(params.tile_size),
                            "overlap": int(params.overlap), "style": params.style,
                            "min_valid_fraction": params.min_valid_fraction}
    if extent is not None:
        body["extent"] = [extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()]
    if bands:
        body["bands"] = list(bands)
    status = manager.call(lambda c: c.submit_job(body), "the annotation job")
    _info(feedback, f"engine job {status['id']}: {status['total']} tiles of {params.tile_size} px from {path}")
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
    tiles = grid.tiles(int(params.tile_size), int(params.overlap))
    health = manager.health()
    _info(feedback, f"{len(tiles)} tiles of {params.tile_size} px rendered by QGIS from '{layer.name()}' "
                    f"({grid.width} x {grid.height} px at {resolution:.6g} units/px); engine: {health.summary()}")
    features = []
    captioned = skipped = 0
    for i, tile in enumerate(tiles):
        if _cancelled(feedback):
            raise CancelledByUser(f"cancelled after {i} of {len(tiles)} tiles; nothing was written to {out}")
        tile_extent = grid.tile_extent(tile.window)
        image = render_image(layer, tile_extent, crs, tile.window.width, tile.window.height)
        valid = valid_fraction(image)
        answer = None
        reason = None
        if valid == 0.0 or valid < params.min_valid_fraction:
            reason = skip_reason(valid, params.min_valid_fraction)
            skipped += 1
        else:
            body = {"image_base64": png_base64(image)}
            answer = manager.call(lambda c, body=body: c.caption(body, params.style), f"tile {tile.index}")
            captioned += 1
        props = tile_properties(tile.index, tile.window, tile.row, tile.col, answer, reason, round(valid, 6),
                                ground_resolution_m(tile_extent, crs, resolution), health.model_id, health.backend)
        features.append(feature(tile.index, footprint_wgs84(tile_extent, crs), props))
        if feedback is not None:
            feedback.setProgress(100.0 * (i + 1) / len(tiles))
    if _cancelled(feedback):
        raise CancelledByUser(f"cancelled after {len(tiles)} of {len(tiles)} tiles; nothing was written to {out}")
    info = {
        "georeferenced": True, "coordinate_space": "EPSG:4326", "source_crs": crs.authid() or crs.toWkt(),
        "raster_size": [grid.width, grid.height], "raster": source_label or layer.source(), "bands": None,
        "tiling": {"tile_size": f"{int(params.tile_size)}px", "overlap": int(params.overlap),
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
