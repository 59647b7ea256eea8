"""Tile grids and extents: which pixel windows a batch job reads.

Tile grid (:func:`plan_tiles`, :func:`tile_grid`)
    Tiles of ``tile_size`` (pixels, ``"512"``, or ground metres, ``"500m"``, converted with the
    raster's ground resolution per axis, so a metre tile on an EPSG:4326 layer may be
    non-square in pixels) step by ``size - overlap`` over the layer or an extent window, row by
    row from the top-left; ``tile_index`` counts in that order from 0. Edge tiles are CLIPPED
    to the extent, not shifted back inside it: every footprint covers exactly the pixels that
    were read, and no pixel is captioned twice except in the requested overlap. An edge strip
    narrower than half a tile (:data:`MIN_EDGE_FRACTION`) is no tile of its own: the last tile of
    its row / column reaches to the extent's edge instead (at most 1.5x the size that way), since a
    sliver stretched to the model's square input reads as something else (a 27 px strip of an
    orthophoto was captioned as a runway). A tile larger than the extent gives one tile, the
    extent itself. Callers that need square model input get it from
    :meth:`engine.raster.RasterSource.read_tile` (which resamples the clipped window to the model size).

Extents (:func:`extent_to_window`)
    ``(minx, miny, maxx, maxy)`` in the raster CRS or in ``extent_crs`` (reprojected with
    densified edges) becomes the smallest pixel window covering it, clipped to the raster.
    Empty extents and extents that miss the raster raise :class:`engine.errors.UserInputError`.
    On a raster without georeferencing the extent is in its pixel space (``x = col, y = -row``).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from pyproj import CRS

from engine.errors import UserInputError
from engine.georef import GeoReference, Window, apply_transform, cached_transformer
from engine.raster import RasterSource, as_georef

log = logging.getLogger(__name__)


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


#: an edge strip narrower than this fraction of a tile joins the tile before it (no sliver tiles)
MIN_EDGE_FRACTION = 0.5


def _spans(offset: int, length: int, size: int, stride: int) -> list[tuple[int, int]]:
    """(start, length) of the tiles along one axis of an extent: ``size`` long, ``stride`` apart, the last
    one clipped to the extent, or, where it would be shorter than :data:`MIN_EDGE_FRACTION` of a tile,
    dropped and the one before it reaching to the extent's end."""
    end = offset + length
    if length <= size:
        return [(offset, length)]
    count = math.ceil((length - size) / stride) + 1
    starts = [offset + i * stride for i in range(count)]
    if end - starts[-1] < size * MIN_EDGE_FRACTION:
        starts.pop()
    return [(start, size if i < len(starts) - 1 else end - start) for i, start in enumerate(starts)]


def tile_grid(extent: Window, tile_width: int, tile_height: int | None = None, overlap: int = 0) -> list[Tile]:
    """Cut ``extent`` into tiles; edge tiles are clipped to it, edge slivers join their neighbour (see the
    module docstring).

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
    cols = _spans(extent.col_off, extent.width, tile_width, tile_width - overlap)
    rows = _spans(extent.row_off, extent.height, tile_height, tile_height - overlap)
    tiles = []
    for r, (row_off, height) in enumerate(rows):
        for c, (col_off, width) in enumerate(cols):
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
    georef = as_georef(source)
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
        The raster (or its :class:`~engine.georef.GeoReference`).
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
    georef = as_georef(source)
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
