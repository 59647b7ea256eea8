"""engine.tiling on real rasters: tile sizes, tile grids, extents to pixel windows."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import array_bounds

from engine.errors import UserInputError
from engine.footprints import footprint_wgs84
from engine.georef import Window
from engine.raster import RasterSource
from engine.tiling import TileSize, extent_to_window, parse_tile_size, plan_tiles, tile_grid
from tests.raster_files import PNG, S2, USGS, assert_one_line


# ---------------------------------------------------------------------------------------------
# tile sizes and grids
# ---------------------------------------------------------------------------------------------
def test_parse_tile_size() -> None:
    assert parse_tile_size("512") == TileSize(512, "px") == parse_tile_size(512) == parse_tile_size("512px")
    assert parse_tile_size("500m") == TileSize(500.0, "m")
    assert parse_tile_size("1.5km") == TileSize(1500.0, "m")
    assert str(parse_tile_size("512")) == "512px" and str(parse_tile_size("500m")) == "500m"
    for bad in ("0", "-5", "abc", "512.5px", "", "12 furlongs", True):
        with pytest.raises(UserInputError):
            parse_tile_size(bad)


def test_grid_covers_extent_with_clipped_edges() -> None:
    tiles = tile_grid(Window(0, 0, 1000, 900), 512)
    assert [t.window.to_list() for t in tiles] == [
        [0, 0, 512, 512], [512, 0, 488, 512], [0, 512, 512, 388], [512, 512, 488, 388]]
    assert [(t.index, t.row, t.col) for t in tiles] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    over = tile_grid(Window(0, 0, 1300, 1300), 512, overlap=64)  # stride 448: 0, 448, 896
    assert [t.window.col_off for t in over[:3]] == [0, 448, 896] and over[2].window.width == 404
    assert len(over) == 9


def test_edge_slivers_join_the_tile_before_them() -> None:
    # a strip narrower than half a tile would be stretched to the model's square input: the last tile takes it
    tiles = tile_grid(Window(0, 0, 1000, 700), 512)  # rows: 512 + a 188 px strip -> one row of 700
    assert [t.window.to_list() for t in tiles] == [[0, 0, 512, 700], [512, 0, 488, 700]]
    assert [t.window.to_list() for t in tile_grid(Window(10, 20, 512, 512), 485)] == [[10, 20, 512, 512]]
    over = tile_grid(Window(0, 0, 1024, 1024), 512, overlap=64)  # starts 0, 448, 896: the 128 px strip joins
    assert [(t.window.col_off, t.window.width) for t in over[:2]] == [(0, 512), (448, 576)] and len(over) == 4
    for extent, size, overlap in ((Window(3, 5, 997, 611), 200, 0), (Window(0, 0, 1000, 1000), 300, 40)):
        cover = np.zeros((extent.row_end, extent.col_end), dtype=int)
        for t in tile_grid(extent, size, overlap=overlap):
            w = t.window
            assert size * 0.5 <= min(w.width, w.height) and max(w.width, w.height) < size * 1.5
            cover[w.row_off:w.row_end, w.col_off:w.col_end] += 1
        assert (cover[extent.row_off:, extent.col_off:] >= 1).all()
        assert cover[:extent.row_off].sum() == 0 and cover[:, :extent.col_off].sum() == 0
    # every pixel of an offset extent is covered, nothing outside it
    extent = Window(37, 11, 300, 123)
    cover = np.zeros((200, 400), dtype=int)
    for t in tile_grid(extent, 64, 50, overlap=10):
        w = t.window
        cover[w.row_off:w.row_end, w.col_off:w.col_end] += 1
    assert (cover[11:134, 37:337] >= 1).all() and cover.sum() >= 300 * 123
    assert cover[:11].sum() == 0 and cover[:, :37].sum() == 0 and cover[134:].sum() == 0 and cover[:, 337:].sum() == 0


def test_tile_bigger_than_raster_gives_one_clipped_tile() -> None:
    with RasterSource(S2) as src:
        tiles = plan_tiles(src, "2048")
        assert len(tiles) == 1 and tiles[0].window == Window(0, 0, 512, 512)
        part = plan_tiles(src, "10km", extent=Window(100, 50, 200, 300))  # 1000 px > extent
        assert [t.window for t in part] == [Window(100, 50, 200, 300)]


def test_overlap_is_validated() -> None:
    for overlap in (-1, 512, 600, 1.5):
        with pytest.raises(UserInputError) as info:
            tile_grid(Window(0, 0, 1024, 1024), 512, overlap=overlap)
        assert_one_line(info.value, "overlap")


def test_tile_size_in_metres_uses_ground_resolution() -> None:
    with RasterSource(S2) as src:  # ~10 m
        assert plan_tiles(src, "1280m")[0].window.width == 128
    with RasterSource(USGS) as src:  # 0.1524 m on the ground, 0.2022 in EPSG:3857 units
        w = plan_tiles(src, "39m")[0].window
        assert (w.width, w.height) == (256, 257) or abs(w.width - 256) <= 1
    with RasterSource(PNG) as src:
        with pytest.raises(UserInputError) as info:
            plan_tiles(src, "500m")
        assert_one_line(info.value, "pixels")
        assert len(plan_tiles(src, "128")) == 4


# ---------------------------------------------------------------------------------------------
# extents
# ---------------------------------------------------------------------------------------------
def test_extent_to_window_in_raster_crs() -> None:
    with RasterSource(S2) as src, rasterio.open(S2) as ds:
        assert extent_to_window(src, tuple(ds.bounds)) == src.full_window
        w = Window(10, 20, 30, 40)
        bounds = array_bounds(40, 30, ds.window_transform(w.to_rasterio()))
        assert extent_to_window(src, (bounds[0], bounds[1], bounds[2], bounds[3])) == w
        # a partial overlap is clipped to the raster
        left, bottom, right, top = ds.bounds
        clipped = extent_to_window(src, (left - 5000, top - 1000, left + 1000, top + 5000))
        assert clipped == Window(0, 0, 100, 100)


def test_extent_in_another_crs() -> None:
    with RasterSource(USGS) as src:
        fp = footprint_wgs84(src, Window(100, 100, 200, 200))
        w = extent_to_window(src, fp.bounds, extent_crs="EPSG:4326")
        assert abs(w.col_off - 100) <= 1 and abs(w.row_off - 100) <= 1
        assert abs(w.width - 200) <= 2 and abs(w.height - 200) <= 2
    with RasterSource(S2) as src:  # a lon/lat box around the Sentinel-2 scene gives all of it
        assert extent_to_window(src, (-76.5, 37.0, -75.0, 38.5), "EPSG:4326") == src.full_window


def test_bad_extents() -> None:
    with RasterSource(S2) as src:
        left, bottom, right, top = src.georef.bounds
        for zero in ((left + 100, bottom + 100, left + 100, top), (left, bottom + 10, right, bottom + 10),
                     (right, bottom, left, top)):
            with pytest.raises(UserInputError) as info:
                extent_to_window(src, zero)
            assert_one_line(info.value, "zero or negative")
        with pytest.raises(UserInputError) as info:
            extent_to_window(src, (right + 10, bottom, right + 500, top))
        assert_one_line(info.value, "does not overlap", "EPSG:32618")
        with pytest.raises(UserInputError) as info:  # New York is not in this scene
            extent_to_window(src, (-72.4, 41.0, -72.3, 41.1), extent_crs="EPSG:4326")
        assert_one_line(info.value, "does not overlap")
        with pytest.raises(UserInputError):
            extent_to_window(src, (0, 0, 1), None)
        with pytest.raises(UserInputError):
            extent_to_window(src, (0, 0, 1, 1), "EPSG:999999")
    with RasterSource(PNG) as src:
        assert extent_to_window(src, (10, -60, 50, -20)) == Window(10, 20, 40, 40)
        with pytest.raises(UserInputError):
            extent_to_window(src, (0, 0, 1, 1), "EPSG:4326")
