"""What a batch job writes: tile records, the GeoJSON FeatureCollection and the GeoPackage, atomically.

Records (:class:`TileRecord`)
    What a job knows about one finished tile: one Feature, one journal line.

GeoJSON
    :func:`feature_collection` builds an RFC 7946 FeatureCollection from :class:`TileRecord` s,
    ordered by tile index, one Feature per tile (``id`` = tile index, geometry from
    :func:`engine.footprints.tile_geometry`) with properties ``tile_index``, ``window``
    ([col_off, row_off, width, height]), ``caption`` (null when skipped), ``skipped`` (the reason,
    or null), ``valid_fraction``, ``ground_resolution_m`` (metres per raster pixel at the tile
    centre) and the caller's ``extra`` properties (expert segments, model id, backend, timing...).
    The top-level foreign member ``rsmoe`` carries georeferencing facts and the caller's metadata;
    a raster without georeferencing gives pixel-space footprints and says so: ``"rsmoe":
    {"georeferenced": false, "coordinate_space": "pixel", ...}``, with no CRS claimed.
    :func:`write_geojson_atomic` writes it atomically (temp file in the same folder, fsync,
    ``os.replace``).

GeoPackage
    :func:`write_gpkg` writes the same records to a GeoPackage in the raster CRS (through pyogrio),
    atomically too.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import shapely

from engine.errors import RSMoEError, UserInputError
from engine.footprints import footprint, tile_geometry
from engine.georef import GeoReference, Window
from engine.raster import RasterSource, TileRead, as_georef

log = logging.getLogger(__name__)

#: Properties every Feature has; ``extra`` may not reuse these names.
CORE_PROPERTIES = ("tile_index", "window", "caption", "skipped", "valid_fraction", "ground_resolution_m")


# --------------------------------------------------------------------------------------------
# Records and GeoJSON
# --------------------------------------------------------------------------------------------
@dataclass
class TileRecord:
    """What a job knows about one finished tile (one Feature, one journal line).

    ``caption`` is None exactly when ``skipped`` gives a reason. ``extra`` holds JSON-able
    properties from the caller (expert segments, model id, backend, per-tile timing, ...).
    """

    tile_index: int
    window: Window
    caption: str | None = None
    skipped: str | None = None
    valid_fraction: float | None = None
    ground_resolution_m: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.caption is None) == (self.skipped is None):
            raise ValueError("a tile record has either a caption or a skip reason")
        clash = set(self.extra) & set(CORE_PROPERTIES)
        if clash:
            raise ValueError(f"extra properties may not reuse the core names {sorted(clash)}")

    @classmethod
    def from_read(cls, tile_index: int, read: TileRead, caption: str | None = None,
                  ground_resolution_m: float | None = None, **extra: Any) -> TileRecord:
        """A record for a tile read: skipped reads carry their reason, others need ``caption``."""
        return cls(tile_index, read.window, None if read.skipped else caption, read.skipped,
                   read.valid_fraction, ground_resolution_m, dict(extra))

    def properties(self) -> dict[str, Any]:
        props: dict[str, Any] = {
            "tile_index": self.tile_index,
            "window": self.window.to_list(),
            "caption": self.caption,
            "skipped": self.skipped,
            "valid_fraction": self.valid_fraction,
            "ground_resolution_m": self.ground_resolution_m,
        }
        props.update(self.extra)
        return props

    def to_json(self) -> dict[str, Any]:
        data = self.properties()
        data = {k: data[k] for k in CORE_PROPERTIES}
        data["extra"] = self.extra
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TileRecord:
        return cls(int(data["tile_index"]), Window.from_list(data["window"]), data.get("caption"),
                   data.get("skipped"), data.get("valid_fraction"), data.get("ground_resolution_m"),
                   dict(data.get("extra") or {}))


def _sorted_unique(records: Iterable[TileRecord]) -> list[TileRecord]:
    by_index: dict[int, TileRecord] = {}
    for rec in records:
        by_index[rec.tile_index] = rec  # a tile done twice: the later record wins
    return [by_index[i] for i in sorted(by_index)]


def feature_collection(
    records: Iterable[TileRecord],
    source: GeoReference | RasterSource,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An RFC 7946 FeatureCollection of tile footprints, ordered by tile index.

    ``metadata`` (JSON-able: model id, backend, raster path, tiling...) goes into the top-level
    ``rsmoe`` member together with ``georeferenced``, ``coordinate_space`` and, for a
    georeferenced raster, ``source_crs``. Nothing wall-clock dependent is added here.
    """
    georef = as_georef(source)
    info: dict[str, Any] = {"georeferenced": georef.georeferenced}
    if georef.georeferenced:
        info["coordinate_space"] = "EPSG:4326"
        info["source_crs"] = georef.crs_string
    else:
        info["coordinate_space"] = "pixel"
        info["pixel_axes"] = "x = column, y = -row (the raster has no georeferencing)"
    info["raster_size"] = [georef.width, georef.height]
    info.update(metadata or {})
    features = [
        {"type": "Feature", "id": rec.tile_index, "geometry": tile_geometry(georef, rec.window),
         "properties": rec.properties()}
        for rec in _sorted_unique(records)
    ]
    return {"type": "FeatureCollection", "rsmoe": info, "features": features}


def dumps_geojson(fc: Mapping[str, Any]) -> str:
    """Serialise a FeatureCollection: one Feature per line, UTF-8, no NaN (strict JSON)."""
    head = {k: v for k, v in fc.items() if k != "features"}
    dump = lambda obj: json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))  # noqa: E731
    lines = [dump(f) for f in fc.get("features", [])]
    body = ",\n".join(lines)
    return dump(head)[:-1] + ',"features":[\n' + body + ("\n" if lines else "") + "]}\n"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_atomic(path: Path, write: Any, suffix: str) -> None:
    """Write through ``write(tmp_path)`` to a temp file beside ``path``, fsync it, then os.replace."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UserInputError(f"cannot write '{path}': folder '{directory}' does not exist")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=directory)
    except OSError as exc:
        raise UserInputError(f"cannot write '{path}': {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserInputError(f"cannot write '{path}': {exc.strerror or exc}") from None
        raise
    _fsync_dir(directory)


def write_geojson_atomic(path: str | os.PathLike[str], fc: Mapping[str, Any]) -> Path:
    """Write a FeatureCollection atomically: a reader sees the old file or the new one, never half.

    The whole document is serialised before anything touches the disk, so a serialisation
    error (NaN, an object JSON cannot hold) leaves any previous file as it was.
    """
    text = dumps_geojson(fc)
    data = text.encode("utf-8")
    _replace_atomic(Path(path), lambda tmp: tmp.write_bytes(data), ".tmp")
    log.info("wrote %d feature(s) to %s", len(fc.get("features", [])), path)
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write a JSON document (indented, UTF-8, strict) atomically, as :func:`write_geojson_atomic` does."""
    data = (json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=1) + "\n").encode("utf-8")
    _replace_atomic(Path(path), lambda tmp: tmp.write_bytes(data), ".tmp")
    return Path(path)


# --------------------------------------------------------------------------------------------
# GeoPackage
# --------------------------------------------------------------------------------------------
def _column(values: list[Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """A typed field array (+ null mask) from per-record values; lists / dicts become JSON text."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        kind: Any = bool
    elif present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        kind = np.int64
    elif present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        arr = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
        return arr, None
    else:
        texts = [None if v is None else v if isinstance(v, str)
                 else json.dumps(v, ensure_ascii=False) for v in values]
        return np.array(texts, dtype=object), None
    mask = np.array([v is None for v in values])
    arr = np.array([kind() if v is None else v for v in values], dtype=kind)
    return arr, (mask if mask.any() else None)


def write_gpkg(
    path: str | os.PathLike[str],
    records: Iterable[TileRecord],
    source: GeoReference | RasterSource,
    layer: str = "tiles",
) -> Path:
    """Write tile records to a GeoPackage layer of polygons in the raster CRS, atomically.

    Fields: the core properties (``window`` as JSON text plus ``col_off``, ``row_off``,
    ``width``, ``height``), then every ``extra`` key (scalars typed, lists / dicts as JSON text).
    A raster without georeferencing gives a layer in pixel space without a CRS.
    """
    try:
        from pyogrio.raw import write as ogr_write
    except ImportError:  # pragma: no cover - pyogrio is a declared dependency
        raise RSMoEError("GeoPackage output needs pyogrio (pip install pyogrio==0.13.0)") from None
    georef = as_georef(source)
    recs = _sorted_unique(records)
    if not recs:
        raise UserInputError("no tiles to write to the GeoPackage")
    geometry = np.array([shapely.to_wkb(footprint(georef, r.window)) for r in recs], dtype=object)
    columns: dict[str, list[Any]] = {
        "tile_index": [r.tile_index for r in recs],
        "col_off": [r.window.col_off for r in recs],
        "row_off": [r.window.row_off for r in recs],
        "width": [r.window.width for r in recs],
        "height": [r.window.height for r in recs],
        "window": [r.window.to_list() for r in recs],
        "caption": [r.caption for r in recs],
        "skipped": [r.skipped for r in recs],
        "valid_fraction": [r.valid_fraction for r in recs],
        "ground_resolution_m": [r.ground_resolution_m for r in recs],
    }
    extra_keys = list(dict.fromkeys(k for r in recs for k in r.extra))
    for key in extra_keys:
        if key.lower() in {c.lower() for c in columns} or key.lower() in ("fid", "geom"):
            continue
        columns[key] = [r.extra.get(key) for r in recs]
    names, data, masks = [], [], []
    for name, values in columns.items():
        arr, mask = _column(values)
        names.append(name)
        data.append(arr)
        masks.append(mask)
    crs_wkt = georef.crs.to_wkt() if georef.crs is not None else None

    def write(tmp: Path) -> None:
        tmp.unlink(missing_ok=True)  # GDAL creates the file itself
        ogr_write(str(tmp), geometry, data, names, field_mask=masks, layer=layer, driver="GPKG",
                  geometry_type="Polygon", crs=crs_wkt)

    try:
        _replace_atomic(Path(path), write, ".gpkg")
    except (UserInputError, RSMoEError):
        raise
    except Exception as exc:  # pyogrio / GDAL errors
        log.debug("GeoPackage write failed", exc_info=True)
        raise UserInputError(f"cannot write GeoPackage '{path}': {' '.join(str(exc).split())[:300]}") from None
    log.info("wrote %d tile(s) to %s (layer %s)", len(recs), path, layer)
    return Path(path)
