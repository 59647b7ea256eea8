"""Tile footprints: a pixel window's polygon in the raster CRS, or in EPSG:4326 for GeoJSON.

:func:`footprint` is a tile's polygon in the raster CRS (its four corners, exact for an affine
transform). :func:`footprint_wgs84` reprojects it to EPSG:4326 (pyproj, ``always_xy=True``:
longitude first, as RFC 7946 wants) after densifying every edge, so curved edges of a
reprojected tile stay honest (points per edge doubled until no chord departs from the
true edge by more than 5e-7 degree, about 5 cm); collinear vertices are then simplified away (1e-7 degree
tolerance, ~1 cm), coordinates rounded to 7 decimals, rings counter-clockwise, and a
footprint that crosses the antimeridian is cut into a MultiPolygon. Rasters without
georeferencing give pixel-space footprints (``x = col, y = -row``, as QGIS places such an
image): :func:`tile_geometry` picks the one a Feature gets.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import shapely
from pyproj import CRS
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon, box, mapping
from shapely.geometry.polygon import orient

from engine.errors import UserInputError
from engine.georef import GeoReference, Window, apply_transform, cached_transformer
from engine.raster import RasterSource, as_georef

WGS84 = CRS.from_epsg(4326)
#: Points per footprint edge to start from before reprojection to EPSG:4326 ...
DENSIFY_POINTS = 8
#: ... doubled until reprojected edges depart from their chords by at most this (degrees; ~5 cm).
DENSIFY_TOLERANCE = 5e-7
#: Decimal places of longitude / latitude in the GeoJSON (1e-7 degree is about 1 cm).
COORD_DECIMALS = 7


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
    georef = as_georef(source)
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
    georef = as_georef(source)
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
    georef = as_georef(source)
    geom = footprint_wgs84(georef, window) if georef.georeferenced else footprint(georef, window)
    return _geojson_geometry(geom)


def _geojson_geometry(geom: Polygon | MultiPolygon) -> dict[str, Any]:
    return json.loads(json.dumps(mapping(geom)))  # tuples -> lists
