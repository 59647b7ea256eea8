"""Geometry of batch annotation: tile grids, extents, footprints, GeoJSON / GeoPackage, resume journal.

Tile grid (:func:`plan_tiles`, :func:`tile_grid`)
    Tiles of ``tile_size`` (pixels, ``"512"``, or ground metres, ``"500m"``, converted with the
    raster's ground resolution per axis, so a metre tile on an EPSG:4326 layer may be
    non-square in pixels) step by ``size - overlap`` over the layer or an extent window, row by
    row from the top-left; ``tile_index`` counts in that order from 0. Edge tiles are CLIPPED
    to the extent, not shifted back inside it: every footprint covers exactly the pixels that
    were read, and no pixel is captioned twice except in the requested overlap. A tile larger
    than the extent gives one tile, the extent itself. Callers that need square model input
    get it from :meth:`engine.raster.RasterSource.read_tile` (which resamples the clipped
    window to the model size).

Extents (:func:`extent_to_window`)
    ``(minx, miny, maxx, maxy)`` in the raster CRS or in ``extent_crs`` (reprojected with
    densified edges) becomes the smallest pixel window covering it, clipped to the raster.
    Empty extents and extents that miss the raster raise :class:`engine.errors.UserInputError`.
    On a raster without georeferencing the extent is in its pixel space (``x = col, y = -row``).

Footprints
    :func:`footprint` is a tile's polygon in the raster CRS (its four corners, exact for an affine
    transform). :func:`footprint_wgs84` reprojects it to EPSG:4326 (pyproj, ``always_xy=True``:
    longitude first, as RFC 7946 wants) after densifying every edge, so curved edges of a
    reprojected tile stay honest (points per edge doubled until no chord departs from the
    true edge by more than 5e-7 degree, about 5 cm); collinear vertices are then simplified away (1e-7 degree
    tolerance, ~1 cm), coordinates rounded to 7 decimals, rings counter-clockwise, and a
    footprint that crosses the antimeridian is cut into a MultiPolygon. Rasters without
    georeferencing give pixel-space footprints (``x = col, y = -row``, as QGIS places such an
    image) and their FeatureCollection says so: ``"rsmoe": {"georeferenced": false,
    "coordinate_space": "pixel", ...}``, with no CRS claimed.

Output
    :func:`feature_collection` builds an RFC 7946 FeatureCollection from :class:`TileRecord` s,
    ordered by tile index, one Feature per tile (``id`` = tile index) with properties
    ``tile_index``, ``window`` ([col_off, row_off, width, height]), ``caption`` (null when
    skipped), ``skipped`` (the reason, or null), ``valid_fraction``, ``ground_resolution_m``
    (metres per raster pixel at the tile centre) and the caller's ``extra`` properties (expert
    segments, model id, backend, timing...). The top-level foreign member ``rsmoe`` carries
    georeferencing facts and the caller's metadata. :func:`write_geojson_atomic` writes it
    atomically (temp file in the same folder, fsync, ``os.replace``); :func:`write_gpkg` writes
    the same records to a GeoPackage in the raster CRS (through pyogrio).

Resume (:class:`TileJournal`)
    An append-only JSON-lines file beside the output (``OUT.geojson.journal``): a header line
    identifying the job, then one line per finished tile, flushed and fsynced as each completes.
    Resuming with a different header is refused (:class:`engine.errors.JobError`); a torn last
    line (a run killed mid-write) is dropped. The final GeoJSON must be built from the journal's
    records (``journal.records()``), so a resumed run writes exactly what an uninterrupted run
    writes: per-tile timing is fine inside ``extra`` because it is journalled with the tile.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import shapely
from pyproj import CRS
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon, box, mapping
from shapely.geometry.polygon import orient

from engine.errors import JobError, RSMoEError, UserInputError
from engine.raster import GeoReference, RasterSource, TileRead, Window, apply_transform, cached_transformer

log = logging.getLogger(__name__)

WGS84 = CRS.from_epsg(4326)
#: Points per footprint edge to start from before reprojection to EPSG:4326 ...
DENSIFY_POINTS = 8
#: ... doubled until reprojected edges depart from their chords by at most this (degrees; ~5 cm).
DENSIFY_TOLERANCE = 5e-7
#: Decimal places of longitude / latitude in the GeoJSON (1e-7 degree is about 1 cm).
COORD_DECIMALS = 7
#: Properties every Feature has; ``extra`` may not reuse these names.
CORE_PROPERTIES = ("tile_index", "window", "caption", "skipped", "valid_fraction", "ground_resolution_m")


def _as_georef(source: GeoReference | RasterSource) -> GeoReference:
    return source.georef if isinstance(source, RasterSource) else source


# --------------------------------------------------------------------------------------------
# Tile sizes and grids
# --------------------------------------------------------------------------------------------
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(px|m|km)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class TileSize:
    """A tile edge length: ``value`` in pixels (``unit="px"``) or ground metres (``unit="m"``)."""

    value: float
    unit: str = "px"

    def __post_init__(self) -> None:
        if self.unit not in ("px", "m"):
            raise UserInputError(f"tile size unit must be 'px' or 'm', got {self.unit!r}")
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value > 0):
            raise UserInputError(f"tile size must be a positive number, got {self.value!r}")
        if self.unit == "px" and float(self.value) != int(self.value):
            raise UserInputError(f"a tile size in pixels must be a whole number, got {self.value}")

    def __str__(self) -> str:
        return f"{int(self.value)}px" if self.unit == "px" else f"{self.value:g}m"

    def to_pixels(self, ground_resolution_xy: tuple[float, float] | None) -> tuple[int, int]:
        """(width, height) in pixels; metres are divided by the ground resolution per axis."""
        if self.unit == "px":
            return int(self.value), int(self.value)
        if ground_resolution_xy is None:
            raise UserInputError(
                f"tile size {self} is in metres but the raster has no georeferencing; give it in pixels"
            )
        return tuple(max(1, round(self.value / r)) for r in ground_resolution_xy)  # type: ignore[return-value]


def parse_tile_size(spec: str | int | float | TileSize) -> TileSize:
    """``512``, ``"512"``, ``"512px"`` -> pixels; ``"500m"``, ``"1.5km"`` -> metres."""
    if isinstance(spec, TileSize):
        return spec
    if isinstance(spec, bool):
        raise UserInputError(f"invalid tile size {spec!r}")
    if isinstance(spec, (int, float)):
        return TileSize(spec, "px")
    match = _SIZE_RE.match(str(spec))
    if not match:
        raise UserInputError(f"invalid tile size {spec!r}: use pixels ('512', '512px') or metres ('500m', '2km')")
    value, unit = float(match.group(1)), (match.group(2) or "px").lower()
    if unit == "km":
        value, unit = value * 1000.0, "m"
    return TileSize(int(value) if unit == "px" and value.is_integer() else value, unit)


@dataclass(frozen=True)
class Tile:
    """One tile of a grid: its index (row-major from 0), grid row / column and pixel window."""

    index: int
    row: int
    col: int
    window: Window


def _starts(offset: int, length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [offset]
    count = math.ceil((length - size) / stride) + 1
    return [offset + i * stride for i in range(count)]


def tile_grid(extent: Window, tile_width: int, tile_height: int | None = None, overlap: int = 0) -> list[Tile]:
    """Cut ``extent`` into tiles; edge tiles are clipped to it (see the module docstring).

    Parameters
    ----------
    extent
        Pixel window to cover (the whole raster: ``Window(0, 0, width, height)``).
    tile_width, tile_height
        Tile size in pixels (height defaults to width).
    overlap
        Pixels shared by neighbouring tiles, ``0 <= overlap < tile size``.
    """
    tile_height = tile_width if tile_height is None else tile_height
    for name, value in (("tile width", tile_width), ("tile height", tile_height)):
        if int(value) != value or value < 1:
            raise UserInputError(f"{name} must be a whole number of pixels >= 1, got {value}")
    if int(overlap) != overlap or overlap < 0 or overlap >= min(tile_width, tile_height):
        raise UserInputError(
            f"overlap must be a whole number of pixels with 0 <= overlap < tile size "
            f"({tile_width} x {tile_height}), got {overlap}"
        )
    tile_width, tile_height, overlap = int(tile_width), int(tile_height), int(overlap)
    cols = _starts(extent.col_off, extent.width, tile_width, tile_width - overlap)
    rows = _starts(extent.row_off, extent.height, tile_height, tile_height - overlap)
    tiles = []
    for r, row_off in enumerate(rows):
        for c, col_off in enumerate(cols):
            width = min(tile_width, extent.col_end - col_off)
            height = min(tile_height, extent.row_end - row_off)
            tiles.append(Tile(len(tiles), r, c, Window(col_off, row_off, width, height)))
    return tiles


@dataclass(frozen=True)
class TilingParams:
    """How a job tiles a layer: tile size (pixels or metres), overlap in pixels, optional extent."""

    tile_size: TileSize = field(default_factory=lambda: TileSize(512))
    overlap: int = 0
    extent: Window | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"tile_size": str(self.tile_size), "overlap": self.overlap,
                "extent": self.extent.to_list() if self.extent else None}


def plan_tiles(
    source: GeoReference | RasterSource,
    tile_size: TileSize | str | int,
    overlap: int = 0,
    extent: Window | None = None,
) -> list[Tile]:
    """The tiles of a layer (or of ``extent``), tile size converted to pixels for this raster.

    Metre sizes use the ground resolution at the centre of the extent.
    """
    georef = _as_georef(source)
    full = Window.full(georef.width, georef.height)
    extent = extent or full
    if not full.contains(extent):
        raise UserInputError(
            f"extent window {extent.to_list()} lies outside the raster ({georef.width} x {georef.height})"
        )
    size = parse_tile_size(tile_size)
    res = None
    if size.unit == "m" and georef.georeferenced:
        res = georef.ground_resolution_at(extent.col_off + extent.width / 2, extent.row_off + extent.height / 2)
    width, height = size.to_pixels(res)
    tiles = tile_grid(extent, width, height, overlap)
    log.info("tiling %s x %s px extent %s into %d tile(s) of %s (%d x %d px), overlap %d px",
             extent.width, extent.height, extent.to_list(), len(tiles), size, width, height, overlap)
    return tiles


# --------------------------------------------------------------------------------------------
# Extents
# --------------------------------------------------------------------------------------------
def extent_to_window(
    source: GeoReference | RasterSource,
    extent: Sequence[float],
    extent_crs: CRS | str | None = None,
) -> Window:
    """The pixel window covering ``extent = (minx, miny, maxx, maxy)``, clipped to the raster.

    Parameters
    ----------
    source
        The raster (or its :class:`~engine.raster.GeoReference`).
    extent
        Bounds in ``extent_crs`` (default: the raster's CRS, or pixel space ``x = col, y = -row``
        for a raster without georeferencing).
    extent_crs
        Anything ``pyproj.CRS.from_user_input`` takes (``"EPSG:4326"``, WKT...).

    Raises
    ------
    UserInputError
        Malformed or zero-size extent, extent outside the raster, CRS given for a raster
        without georeferencing.
    """
    georef = _as_georef(source)
    try:
        minx, miny, maxx, maxy = (float(v) for v in extent)
    except (TypeError, ValueError):
        raise UserInputError(f"an extent is (minx, miny, maxx, maxy), got {extent!r}") from None
    if not all(math.isfinite(v) for v in (minx, miny, maxx, maxy)):
        raise UserInputError(f"extent {list(extent)} has non-finite coordinates")
    if not (maxx > minx and maxy > miny):
        raise UserInputError(f"extent {[minx, miny, maxx, maxy]} has zero or negative width or height")
    if extent_crs is not None:
        try:
            crs = CRS.from_user_input(extent_crs)
        except Exception:
            raise UserInputError(f"unknown CRS for the extent: {extent_crs!r}") from None
        if not georef.georeferenced:
            raise UserInputError(f"the raster has no georeferencing; an extent in {extent_crs} cannot be placed on it")
        assert georef.crs is not None
        if not crs.equals(georef.crs):
            tr = cached_transformer(crs.to_wkt(), georef.crs.to_wkt())
            try:
                minx, miny, maxx, maxy = tr.transform_bounds(minx, miny, maxx, maxy, densify_pts=21)
            except Exception:
                raise UserInputError(
                    f"extent {list(extent)} in {extent_crs} cannot be reprojected to the raster CRS "
                    f"{georef.crs_string}"
                ) from None
            if not all(math.isfinite(v) for v in (minx, miny, maxx, maxy)):
                raise UserInputError(f"extent {list(extent)} in {extent_crs} lies outside the raster CRS's area")
    cols, rows = apply_transform(~georef.transform, np.array([minx, minx, maxx, maxx]),
                                 np.array([miny, maxy, miny, maxy]))
    eps = 1e-6
    c0, c1 = math.floor(cols.min() + eps), math.ceil(cols.max() - eps)
    r0, r1 = math.floor(rows.min() + eps), math.ceil(rows.max() - eps)
    c0, r0 = max(c0, 0), max(r0, 0)
    c1, r1 = min(c1, georef.width), min(r1, georef.height)
    if c1 <= c0 or r1 <= r0:
        bx = ", ".join(f"{v:.6g}" for v in georef.bounds)
        raise UserInputError(
            f"extent {[round(v, 6) for v in extent]}{' in ' + str(extent_crs) if extent_crs else ''} "
            f"does not overlap the raster (bounds {bx}"
            f"{' in ' + georef.crs_string if georef.crs_string else ', pixel space'})"
        )
    return Window(c0, r0, c1 - c0, r1 - r0)


# --------------------------------------------------------------------------------------------
# Footprints
# --------------------------------------------------------------------------------------------
def _edge_pixels(window: Window, points_per_edge: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates around a window's outline, clockwise in pixel space, not closed."""
    n = max(1, points_per_edge)
    t = np.arange(n) / n
    c0, r0, c1, r1 = window.col_off, window.row_off, window.col_end, window.row_end
    cols = np.concatenate([c0 + t * (c1 - c0), np.full(n, c1), c1 - t * (c1 - c0), np.full(n, c0)])
    rows = np.concatenate([np.full(n, r0), r0 + t * (r1 - r0), np.full(n, r1), r1 - t * (r1 - r0)])
    return cols, rows


def footprint(source: GeoReference | RasterSource, window: Window) -> Polygon:
    """The window's polygon in the raster CRS (pixel space ``x = col, y = -row`` without georeferencing)."""
    georef = _as_georef(source)
    cols, rows = _edge_pixels(window, 1)
    xs, ys = apply_transform(georef.transform, cols, rows)
    return orient(Polygon(np.column_stack([xs, ys])), 1.0)


def _split_antimeridian(coords: np.ndarray) -> Polygon | MultiPolygon:
    lon = coords[:, 0].copy()
    lon[lon < 0] += 360.0
    poly = Polygon(np.column_stack([lon, coords[:, 1]]))
    west = poly.intersection(box(-1.0, -90.0, 180.0, 90.0))
    east = affinity.translate(poly.intersection(box(180.0, -90.0, 361.0, 90.0)), xoff=-360.0)
    parts: list[Polygon] = []
    for geom in (west, east):
        parts.extend(g for g in getattr(geom, "geoms", [geom]) if isinstance(g, Polygon) and not g.is_empty)
    return MultiPolygon(parts) if len(parts) > 1 else parts[0]


def _lonlat(georef: GeoReference, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    assert georef.crs is not None
    xs, ys = apply_transform(georef.transform, cols, rows)
    if georef.crs.equals(WGS84):
        return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    tr = cached_transformer(georef.crs.to_wkt(), WGS84.to_wkt())
    lon, lat = tr.transform(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float))
    return np.asarray(lon), np.asarray(lat)


def _densified_ring(georef: GeoReference, window: Window, start: int, tolerance: float,
                    max_points: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Lon/lat around a window, points per edge doubled until every chord is within ``tolerance`` degrees."""
    n = max(1, start)
    while True:
        lon, lat = _lonlat(georef, *_edge_pixels(window, 2 * n))
        if not (np.all(np.isfinite(lon)) and np.all(np.isfinite(lat))):
            return lon, lat
        even_lon, even_lat = lon[0::2], lat[0::2]
        step = (np.roll(even_lon, -1) - even_lon + 180.0) % 360.0 - 180.0  # across the antimeridian too
        mid_lon = even_lon + step / 2.0
        mid_lat = (even_lat + np.roll(even_lat, -1)) / 2.0
        dlon = (lon[1::2] - mid_lon + 180.0) % 360.0 - 180.0
        deviation = float(np.max(np.hypot(dlon, lat[1::2] - mid_lat)))
        if deviation <= tolerance or 2 * n >= max_points:
            return lon, lat
        n *= 2


def footprint_wgs84(
    source: GeoReference | RasterSource,
    window: Window,
    densify: int = DENSIFY_POINTS,
    decimals: int = COORD_DECIMALS,
    tolerance: float = DENSIFY_TOLERANCE,
) -> Polygon | MultiPolygon:
    """The window's footprint in EPSG:4326, longitude first (RFC 7946), edges densified.

    Each edge starts with ``densify`` points, doubled until the reprojected curve departs from
    its chords by at most ``tolerance`` degrees; collinear vertices are then simplified away.

    Raises
    ------
    UserInputError
        The raster has no georeferencing, or the tile lies outside its CRS's valid area.
    """
    georef = _as_georef(source)
    if georef.crs is None:
        raise UserInputError("the raster has no georeferencing: its footprints exist in pixel space only")
    lon, lat = _densified_ring(georef, window, densify, tolerance)
    if not (np.all(np.isfinite(lon)) and np.all(np.isfinite(lat))):
        raise UserInputError(f"tile {window.to_list()} lies outside the valid area of {georef.crs_string}")
    if np.any(np.abs(lon) > 180.0 + 1e-9):  # e.g. a 0..360 degree grid
        lon = (lon + 180.0) % 360.0 - 180.0
    coords = np.column_stack([lon, lat])
    geom: Polygon | MultiPolygon
    if np.any(np.abs(np.diff(np.append(lon, lon[0]))) > 180.0):  # an edge jumps across the antimeridian
        geom = _split_antimeridian(coords)
    else:
        geom = Polygon(coords)
    geom = shapely.simplify(geom, 10.0 ** -decimals, preserve_topology=True)
    geom = shapely.transform(geom, lambda c: np.round(c, decimals))
    if isinstance(geom, MultiPolygon):
        return MultiPolygon([orient(p, 1.0) for p in geom.geoms])
    return orient(geom, 1.0)


def tile_geometry(source: GeoReference | RasterSource, window: Window) -> dict[str, Any]:
    """GeoJSON geometry of a tile: lon/lat for a georeferenced raster, else pixel space."""
    georef = _as_georef(source)
    geom = footprint_wgs84(georef, window) if georef.georeferenced else footprint(georef, window)
    return _geojson_geometry(geom)


def _geojson_geometry(geom: Polygon | MultiPolygon) -> dict[str, Any]:
    return json.loads(json.dumps(mapping(geom)))  # tuples -> lists


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
    georef = _as_georef(source)
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
    georef = _as_georef(source)
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


# --------------------------------------------------------------------------------------------
# Resume journal
# --------------------------------------------------------------------------------------------
JOURNAL_VERSION = 1


def journal_path(output: str | os.PathLike[str]) -> Path:
    """``OUT.geojson`` -> ``OUT.geojson.journal``."""
    return Path(str(output) + ".journal")


def raster_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Facts that change when a raster file is replaced: absolute path, byte size, mtime (ns)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return {"path": str(path)}
    return {"path": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, allow_nan=False))


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


class TileJournal:
    """Append-only JSON-lines record of finished tiles, for resuming a batch job.

    Parameters
    ----------
    path
        The journal file (see :func:`journal_path`).
    job
        JSON-able identity of the job: raster (e.g. :func:`raster_identity`), size, bands,
        tiling (:meth:`TilingParams.to_dict`), model id... A resume must present the same.

    Use :meth:`open` to start or resume, :meth:`append` per finished tile, :meth:`records` for
    the finished tiles by index, :meth:`close` at the end (or a ``with`` block).
    """

    def __init__(self, path: str | os.PathLike[str], job: Mapping[str, Any]) -> None:
        self.path = Path(path)
        try:
            self.job = _normalise(dict(job))
        except (TypeError, ValueError) as exc:
            raise JobError(f"the job description cannot be journalled: {exc}") from None
        self._records: dict[int, TileRecord] = {}
        self._fh: Any = None

    @classmethod
    def for_output(cls, output: str | os.PathLike[str], job: Mapping[str, Any]) -> TileJournal:
        return cls(journal_path(output), job)

    # -- reading -----------------------------------------------------------------------------
    def load(self) -> tuple[dict[str, Any] | None, dict[int, TileRecord], int]:
        """Read the journal: (job header or None, records by tile index, byte length of the good part).

        A torn last line (no newline, or not JSON) is ignored; a broken line before it is an error.
        """
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return None, {}, 0
        except OSError as exc:
            raise JobError(f"cannot read journal '{self.path}': {exc.strerror or exc}") from None
        header: dict[str, Any] | None = None
        records: dict[int, TileRecord] = {}
        good = 0
        pos = 0
        lines = blob.split(b"\n")
        for number, line in enumerate(lines, start=1):
            last = number == len(lines)
            end = pos + len(line) + (0 if last else 1)
            if not line.strip():
                pos = end
                if not last:
                    good = end
                continue
            try:
                if last:
                    raise ValueError("no newline: torn write")
                obj = json.loads(line)
                if header is None:
                    if not (isinstance(obj, dict) and obj.get("rsmoe_journal") == JOURNAL_VERSION and "job" in obj):
                        raise JobError(f"'{self.path}' is not an RS-MoE tile journal (version {JOURNAL_VERSION})")
                    header = obj["job"]
                else:
                    rec = TileRecord.from_json(obj)
                    records[rec.tile_index] = rec
            except JobError:
                raise
            except Exception as exc:
                if last or all(not rest.strip() for rest in lines[number:]):
                    log.warning("journal '%s': ignoring a torn last line (%d bytes): %s", self.path, len(line), exc)
                    break
                raise JobError(
                    f"journal '{self.path}' is corrupt at line {number}; delete it to start the job afresh"
                ) from None
            pos = end
            good = end
        return header, records, good

    def records(self) -> dict[int, TileRecord]:
        """Finished tiles by tile index, in index order."""
        return {i: self._records[i] for i in sorted(self._records)}

    # -- writing -----------------------------------------------------------------------------
    def open(self, resume: bool = True) -> dict[int, TileRecord]:
        """Start the journal, or resume it; returns the tiles already finished.

        With ``resume`` and an existing journal of the same job, its records are kept (a torn
        last line is cut off). A journal of a different job raises :class:`JobError`.
        Without ``resume`` an existing journal is replaced by a fresh one.
        """
        header, records, good = self.load() if resume else (None, {}, 0)
        if header is not None:
            if _normalise(header) != self.job:
                diff = "; ".join(_differences(_normalise(header), self.job)[:5])
                raise JobError(
                    f"journal '{self.path}' belongs to a different job ({diff}); resume with the same "
                    f"parameters, or delete the journal / start without resume"
                )
            self._records = records
            try:
                self._fh = open(self.path, "r+b")
                self._fh.truncate(good)
                self._fh.seek(good)
            except OSError as exc:
                raise JobError(f"cannot append to journal '{self.path}': {exc.strerror or exc}") from None
            log.info("resuming from journal %s: %d tile(s) done", self.path, len(records))
        else:
            self._records = {}
            try:
                self._fh = open(self.path, "wb")
            except OSError as exc:
                raise JobError(f"cannot create journal '{self.path}': {exc.strerror or exc}") from None
            self._write_line({"rsmoe_journal": JOURNAL_VERSION, "job": self.job})
        return self.records()

    def _write_line(self, obj: Mapping[str, Any]) -> None:
        line = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"
        try:
            self._fh.write(line.encode("utf-8"))
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise JobError(f"cannot write journal '{self.path}': {exc.strerror or exc}") from None

    def append(self, record: TileRecord) -> None:
        """Record a finished tile durably (written, flushed and fsynced before returning)."""
        if self._fh is None:
            raise JobError(f"journal '{self.path}' is not open")
        try:
            obj = record.to_json()
            json.dumps(obj, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise JobError(f"tile {record.tile_index}: its record cannot be journalled ({exc})") from None
        self._write_line(obj)
        self._records[record.tile_index] = TileRecord.from_json(_normalise(obj))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        """Close and delete the journal (after the final output is written, if wanted)."""
        self.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> TileJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
