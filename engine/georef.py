"""Where a raster's pixels lie: pixel windows, georeferencing (size, transform, CRS), CRS transformers.

Windows (:class:`Window`)
    Column / row offset and size in raster pixels: what is read, what a tile covers, what a
    feature's ``window`` property says.

Georeferencing (:class:`GeoReference`)
    Size, affine transform and CRS (``pyproj.CRS``) of a raster. A raster without a CRS (plain
    PNG/JPEG, world file without ``.prj``, GCP-only scenes) is ``georeferenced=False``: it is worked
    in pixel space with the transform ``x = col, y = -row`` (:data:`PIXEL_TRANSFORM`, the way QGIS
    shows such an image). ``ground_resolution_at`` is in metres per pixel measured on the ellipsoid
    (so it is right for EPSG:4326 and for EPSG:3857, where the nominal pixel size overstates the
    ground by 1/cos(latitude)).

Transforms
    :func:`apply_transform` maps pixel coordinates through an affine transform, :func:`window_bounds`
    gives a window's bounds, :func:`cached_transformer` an always_xy ``pyproj.Transformer`` between
    two CRSs, built once per pair.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.windows import Window as RioWindow

from engine.errors import RasterError

log = logging.getLogger(__name__)

#: The transform used for rasters without georeferencing: x = column, y = -row (as QGIS shows them).
PIXEL_TRANSFORM = Affine(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


@dataclass(frozen=True)
class Window:
    """A pixel window: column / row offset and size (integers, like rasterio's ``Window``)."""

    col_off: int
    row_off: int
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("col_off", "row_off", "width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) != value:
                raise RasterError(f"window {name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.col_off < 0 or self.row_off < 0:
            raise RasterError(f"window {self.to_list()} has a negative offset")
        if self.width <= 0 or self.height <= 0:
            raise RasterError(f"window {self.to_list()} is empty (width and height must be > 0)")

    @classmethod
    def from_list(cls, values: Sequence[int]) -> Window:
        """Window from ``[col_off, row_off, width, height]``."""
        if len(values) != 4:
            raise RasterError(f"a window is [col_off, row_off, width, height], got {list(values)!r}")
        return cls(*values)

    @classmethod
    def full(cls, width: int, height: int) -> Window:
        return cls(0, 0, width, height)

    def to_list(self) -> list[int]:
        """``[col_off, row_off, width, height]`` (the GeoJSON ``window`` property)."""
        return [self.col_off, self.row_off, self.width, self.height]

    def to_rasterio(self) -> RioWindow:
        return RioWindow(self.col_off, self.row_off, self.width, self.height)

    @property
    def col_end(self) -> int:
        return self.col_off + self.width

    @property
    def row_end(self) -> int:
        return self.row_off + self.height

    def intersection(self, other: Window) -> Window | None:
        """The overlap of two windows, or None when they do not overlap."""
        c0, r0 = max(self.col_off, other.col_off), max(self.row_off, other.row_off)
        c1, r1 = min(self.col_end, other.col_end), min(self.row_end, other.row_end)
        if c1 <= c0 or r1 <= r0:
            return None
        return Window(c0, r0, c1 - c0, r1 - r0)

    def contains(self, other: Window) -> bool:
        return (other.col_off >= self.col_off and other.row_off >= self.row_off
                and other.col_end <= self.col_end and other.row_end <= self.row_end)


@dataclass(frozen=True)
class GeoReference:
    """Where a raster's pixels lie: size, affine transform (pixel -> CRS) and CRS.

    For a raster without a CRS, ``crs`` is None and ``transform`` is :data:`PIXEL_TRANSFORM`.
    Plain data, independent of an open dataset, so jobs can build footprints after closing it.
    """

    width: int
    height: int
    transform: Affine
    crs: CRS | None = None

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None

    @property
    def crs_string(self) -> str | None:
        """``"EPSG:32618"`` when the CRS has an authority code, else its WKT; None in pixel space."""
        if self.crs is None:
            return None
        auth = self.crs.to_authority(min_confidence=90)
        return f"{auth[0]}:{auth[1]}" if auth else self.crs.to_wkt()

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) of the whole raster in its CRS (or pixel space)."""
        return window_bounds(self.transform, Window.full(self.width, self.height))

    def ground_resolution_at(self, col: float, row: float) -> tuple[float, float] | None:
        """Metres per pixel along columns and rows at pixel (col, row), on the CRS's ellipsoid.

        None for a raster without georeferencing or where the CRS cannot be evaluated.
        """
        if self.crs is None:
            return None
        try:
            geodetic = self.crs.geodetic_crs or CRS.from_epsg(4326)
            to_geo = cached_transformer(self.crs.to_wkt(), geodetic.to_wkt())
            t = self.transform
            xs, ys = apply_transform(t, np.array([col, col + 1.0, col]), np.array([row, row, row + 1.0]))
            lon, lat = to_geo.transform(xs, ys)
            if not (np.all(np.isfinite(lon)) and np.all(np.isfinite(lat))):
                raise ValueError("point outside the CRS's area")
            geod = geodetic.get_geod()
            _, _, dist = geod.inv([lon[0], lon[0]], [lat[0], lat[0]], [lon[1], lon[2]], [lat[1], lat[2]])
            res = (float(dist[0]), float(dist[1]))
            if not all(math.isfinite(r) and r > 0 for r in res):
                raise ValueError("degenerate pixel")
            return res
        except Exception as exc:  # pyproj raises several types; fall back to the nominal size
            unit = self.crs.axis_info[0].unit_conversion_factor if self.crs.axis_info else None
            if self.crs.is_projected and unit:
                t = self.transform
                res = (math.hypot(t.a, t.d) * unit, math.hypot(t.b, t.e) * unit)
                log.warning("ground resolution from the nominal pixel size (%s)", exc)
                return res
            log.warning("cannot compute the ground resolution: %s", exc)
            return None


def apply_transform(transform: Affine, cols: Any, rows: Any) -> tuple[Any, Any]:
    """``(x, y)`` of pixel coordinates (scalars or arrays) under an affine transform."""
    t = transform
    return t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f


def window_bounds(transform: Affine, window: Window) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) of a window's four corners under ``transform``."""
    cols = np.array([window.col_off, window.col_end, window.col_end, window.col_off], dtype=float)
    rows = np.array([window.row_off, window.row_off, window.row_end, window.row_end], dtype=float)
    xs, ys = apply_transform(transform, cols, rows)
    return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())


_TRANSFORMERS: dict[tuple[str, str], Transformer] = {}


def cached_transformer(src_wkt: str, dst_wkt: str) -> Transformer:
    """A cached always_xy Transformer (x = easting / longitude first)."""
    key = (src_wkt, dst_wkt)
    if key not in _TRANSFORMERS:
        _TRANSFORMERS[key] = Transformer.from_crs(CRS.from_wkt(src_wkt), CRS.from_wkt(dst_wkt), always_xy=True)
    return _TRANSFORMERS[key]
