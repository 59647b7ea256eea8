"""Tile grids for layers QGIS renders itself (the engine tiles local files on its own).

The grid rules are the engine's (``engine.tiling.tile_grid``): tiles of ``tile_size`` pixels with
``overlap`` pixels shared by neighbours, starting at the top-left corner of the extent, edge
tiles clipped to it, an edge strip narrower than half a tile joined to the tile before it. Pixels
here are those of the extent rendered at a resolution in layer-CRS units per pixel (the layer's own
resolution, its finest tile level, or a chosen one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from qgis.core import QgsRasterDataProvider, QgsRasterLayer, QgsRectangle

from rsmoe_plugin.errors import BadLayerError

#: a rendered batch run refuses to make more tiles than this (a whole web layer at full zoom...)
MAX_RENDERED_TILES = 4096


@dataclass(frozen=True)
class PixelWindow:
    col_off: int
    row_off: int
    width: int
    height: int

    def to_list(self) -> list[int]:
        return [self.col_off, self.row_off, self.width, self.height]


@dataclass(frozen=True)
class Tile:
    index: int
    row: int
    col: int
    window: PixelWindow


#: an edge strip narrower than this fraction of a tile joins the tile before it (the engine's rule)
MIN_EDGE_FRACTION = 0.5


def _spans(length: int, size: int, stride: int) -> list[tuple[int, int]]:
    """(start, length) of the tiles along one axis (the engine's ``engine.tiling._spans``)."""
    if length <= size:
        return [(0, length)]
    count = math.ceil((length - size) / stride) + 1
    starts = [i * stride for i in range(count)]
    if length - starts[-1] < size * MIN_EDGE_FRACTION:
        starts.pop()
    return [(start, size if i < len(starts) - 1 else length - start) for i, start in enumerate(starts)]


def tile_grid(width: int, height: int, tile_size: int, overlap: int = 0) -> list[Tile]:
    """Cut a ``width`` x ``height`` pixel area into tiles (row by row, edge tiles clipped, edge slivers joined)."""
    if int(tile_size) != tile_size or tile_size < 1:
        raise BadLayerError(f"the tile size must be a whole number of pixels >= 1, got {tile_size}")
    if int(overlap) != overlap or overlap < 0 or overlap >= tile_size:
        raise BadLayerError(f"the overlap must be a whole number of pixels with 0 <= overlap < tile size "
                            f"({tile_size}), got {overlap}")
    step = int(tile_size) - int(overlap)
    tiles = []
    for r, (row_off, tile_height) in enumerate(_spans(height, tile_size, step)):
        for c, (col_off, tile_width) in enumerate(_spans(width, tile_size, step)):
            tiles.append(Tile(len(tiles), r, c, PixelWindow(col_off, row_off, tile_width, tile_height)))
    return tiles


def native_resolution(layer: QgsRasterLayer) -> float | None:
    """The layer's own pixel size in layer-CRS units (finest tile level for tiled web layers)."""
    provider = layer.dataProvider()
    if provider is None:
        return None
    if provider.capabilities() & QgsRasterDataProvider.Size and layer.width() > 0:
        return float(min(layer.rasterUnitsPerPixelX(), layer.rasterUnitsPerPixelY()))
    resolutions = [r for r in (provider.nativeResolutions() or []) if r > 0]
    return float(min(resolutions)) if resolutions else None


@dataclass(frozen=True)
class RenderGrid:
    """An extent (layer CRS) seen as a pixel raster at ``resolution`` units per pixel."""

    extent: QgsRectangle
    resolution: float
    width: int
    height: int

    @classmethod
    def of(cls, extent: QgsRectangle, resolution: float) -> RenderGrid:
        if not resolution > 0:
            raise BadLayerError(f"the resolution must be positive, got {resolution}")
        width = max(1, int(math.ceil(extent.width() / resolution - 1e-9)))
        height = max(1, int(math.ceil(extent.height() / resolution - 1e-9)))
        return cls(QgsRectangle(extent), float(resolution), width, height)

    def tile_extent(self, window: PixelWindow) -> QgsRectangle:
        """The map extent (layer CRS) of a pixel window of this grid."""
        x0 = self.extent.xMinimum() + window.col_off * self.resolution
        y1 = self.extent.yMaximum() - window.row_off * self.resolution
        return QgsRectangle(x0, y1 - window.height * self.resolution, x0 + window.width * self.resolution, y1)

    def tiles(self, tile_size: int, overlap: int) -> list[Tile]:
        tiles = tile_grid(self.width, self.height, tile_size, overlap)
        if len(tiles) > MAX_RENDERED_TILES:
            raise BadLayerError(
                f"annotating this extent at {self.resolution:.6g} map units per pixel would make {len(tiles)} tiles "
                f"(at most {MAX_RENDERED_TILES}): choose a smaller extent, a larger tile size or a coarser "
                f"resolution")
        return tiles
