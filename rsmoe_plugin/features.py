"""The tile-caption GeoJSON schema, for tiles the plugin renders itself.

It is the engine's schema (``engine.outputs.feature_collection`` + ``engine.jobs``), so a layer
annotated by the engine from a file and one annotated from QGIS renderings load, style and read
the same: RFC 7946 FeatureCollection in EPSG:4326, ``id`` = tile index, properties
``tile_index, window, caption, skipped, valid_fraction, ground_resolution_m`` then, sorted,
``backend, col, model_id, model_resolution_m, router, row, scene, scene_confidence, segments, uncertain,
uncertainty`` (segments: ``[{expert, text}]``; the last two and ``model_resolution_m`` null for skipped tiles
and for answers of engines that do not send them), and a top-level ``rsmoe`` member describing the run. Files are written atomically (temp file in the
same folder, then ``os.replace``): a cancelled or failed run never leaves a half-written file.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsDistanceArea,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsRectangle,
)

from rsmoe_plugin.client import ModelAnswer
from rsmoe_plugin.tiling import PixelWindow

CORE_PROPERTIES = ("tile_index", "window", "caption", "skipped", "valid_fraction", "ground_resolution_m")
EXTRA_PROPERTIES = ("backend", "col", "model_id", "model_resolution_m", "router", "row", "scene", "scene_confidence",
                    "segments", "uncertain", "uncertainty")
COORD_DECIMALS = 7
WGS84 = QgsCoordinateReferenceSystem("EPSG:4326")


def skip_reason(valid: float, min_valid: float) -> str:
    """The engine's wording for a tile without enough data."""
    if valid == 0.0:
        return "no valid pixels (nodata)"
    shown = f"{valid:.0%}" if valid >= 0.01 else f"{valid:.2%}"
    return f"only {shown} valid pixels (minimum {min_valid:.0%})"


def tile_properties(tile_index: int, window: PixelWindow, row: int, col: int, answer: ModelAnswer | None,
                    skipped: str | None, valid_fraction: float | None, ground_resolution_m: float | None,
                    model_id: str | None, backend: str | None) -> dict[str, Any]:
    """One feature's properties, in the engine's order (see the module docstring)."""
    if (answer is None) == (skipped is None):
        raise ValueError("a tile has either a caption or a skip reason")
    props: dict[str, Any] = {
        "tile_index": tile_index,
        "window": window.to_list(),
        "caption": answer.text if answer is not None else None,
        "skipped": skipped,
        "valid_fraction": valid_fraction,
        "ground_resolution_m": ground_resolution_m,
    }
    extra = {
        "backend": backend,
        "col": col,
        "model_id": model_id,
        "router": answer.router if answer is not None else None,
        "row": row,
        "scene": answer.scene if answer is not None else None,
        "scene_confidence": answer.scene_confidence if answer is not None else None,
        "segments": [{"expert": s.expert, "text": s.text} for s in answer.segments] if answer is not None else None,
        "model_resolution_m": answer.model_resolution_m if answer is not None else None,
        "uncertain": None,
        "uncertainty": None,
    }
    if answer is not None and "uncertain" in answer.raw:  # an engine that says how sure it is
        extra.update(uncertain=answer.uncertain, uncertainty=list(answer.uncertainty))
    props.update({k: extra[k] for k in EXTRA_PROPERTIES})
    return props


def _ring_ccw(ring: list[list[float]]) -> list[list[float]]:
    area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:], strict=False))
    return ring if area >= 0 else ring[::-1]


def footprint_wgs84(extent: QgsRectangle, crs: QgsCoordinateReferenceSystem,
                    points_per_edge: int = 8) -> dict[str, Any]:
    """A tile's footprint as a GeoJSON Polygon in EPSG:4326 (edges densified, 7 decimals, CCW)."""
    geom = QgsGeometry.fromRect(extent).densifyByCount(points_per_edge - 1)
    if crs != WGS84:
        geom.transform(QgsCoordinateTransform(crs, WGS84, QgsProject.instance()))
    polygon = geom.asPolygon()
    ring = [[round(p.x(), COORD_DECIMALS), round(p.y(), COORD_DECIMALS)] for p in polygon[0]]
    dedup = [pt for i, pt in enumerate(ring) if i == 0 or pt != ring[i - 1]]
    if dedup[0] != dedup[-1]:
        dedup.append(dedup[0])
    return {"type": "Polygon", "coordinates": [_ring_ccw(dedup)]}


def ground_resolution_m(extent: QgsRectangle, crs: QgsCoordinateReferenceSystem, resolution: float) -> float | None:
    """Metres per rendered pixel at the centre of ``extent`` (ellipsoidal, as the engine measures)."""
    area = QgsDistanceArea()
    area.setSourceCrs(crs, QgsProject.instance().transformContext())
    if not area.setEllipsoid("EPSG:7030"):  # WGS 84
        area.setEllipsoid("WGS84")
    c = extent.center()
    try:
        dx = area.measureLine(QgsPointXY(c.x() - resolution / 2, c.y()), QgsPointXY(c.x() + resolution / 2, c.y()))
        dy = area.measureLine(QgsPointXY(c.x(), c.y() - resolution / 2), QgsPointXY(c.x(), c.y() + resolution / 2))
    except Exception:  # noqa: BLE001 - QgsCsException outside the CRS's area
        return None
    if not (dx > 0 and dy > 0):
        return None
    return (dx + dy) / 2.0


def feature(tile_index: int, geometry: dict[str, Any], properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Feature", "id": tile_index, "geometry": geometry, "properties": properties}


def feature_collection(features: Iterable[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "rsmoe": dict(info),
            "features": sorted(features, key=lambda f: f["id"])}


def dumps_geojson(fc: dict[str, Any]) -> str:
    """One feature per line, UTF-8, strict JSON (as the engine writes it)."""
    dump = lambda obj: json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))  # noqa: E731
    head = {k: v for k, v in fc.items() if k != "features"}
    lines = [dump(f) for f in fc.get("features", [])]
    return dump(head)[:-1] + ',"features":[\n' + ",\n".join(lines) + ("\n" if lines else "") + "]}\n"


def write_geojson_atomic(path: str | os.PathLike[str], fc: dict[str, Any]) -> Path:
    """Write ``fc`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(dumps_geojson(fc))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
    return target
