"""engine.geo on real rasters: tile grids, extents, footprints, GeoJSON / GeoPackage, resume journal."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from rasterio.transform import array_bounds, xy
from shapely.geometry import Point, Polygon, shape

from engine.errors import JobError, UserInputError
from engine.geo import (
    TileJournal,
    TileRecord,
    TileSize,
    TilingParams,
    dumps_geojson,
    extent_to_window,
    feature_collection,
    footprint,
    footprint_wgs84,
    journal_path,
    parse_tile_size,
    plan_tiles,
    raster_identity,
    tile_grid,
    write_geojson_atomic,
    write_gpkg,
)
from engine.raster import GeoReference, RasterSource, Window

DATA = Path(__file__).resolve().parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "geotiff"
S2 = DATA / "s2_crop512.tif"
RGB_BYTE = DATA / "rgb_byte_nodata.tif"
WORLD = DATA / "world_rgb_4326.tif"
USGS = DATA / "usgs_3857.tif"
PNG = DATA / "s2_plain.png"


def _one_line(exc: Exception, *needles: str) -> None:
    msg = str(exc)
    assert "\n" not in msg and "Traceback" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


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
    tiles = tile_grid(Window(0, 0, 1000, 700), 512)
    assert [t.window.to_list() for t in tiles] == [
        [0, 0, 512, 512], [512, 0, 488, 512], [0, 512, 512, 188], [512, 512, 488, 188]]
    assert [(t.index, t.row, t.col) for t in tiles] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    over = tile_grid(Window(0, 0, 1024, 1024), 512, overlap=64)  # stride 448: 0, 448, 896
    assert [t.window.col_off for t in over[:3]] == [0, 448, 896] and over[2].window.width == 128
    assert len(over) == 9
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
        _one_line(info.value, "overlap")


def test_tile_size_in_metres_uses_ground_resolution() -> None:
    with RasterSource(S2) as src:  # ~10 m
        assert plan_tiles(src, "1280m")[0].window.width == 128
    with RasterSource(USGS) as src:  # 0.1524 m on the ground, 0.2022 in EPSG:3857 units
        w = plan_tiles(src, "39m")[0].window
        assert (w.width, w.height) == (256, 257) or abs(w.width - 256) <= 1
    with RasterSource(PNG) as src:
        with pytest.raises(UserInputError) as info:
            plan_tiles(src, "500m")
        _one_line(info.value, "pixels")
        assert len(plan_tiles(src, "128")) == 4


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


@pytest.mark.skipif(not (SHARED / "sat_testdata").is_dir(), reason="../shared/data not present")
def test_full_sentinel2_crop_footprints() -> None:
    path = SHARED / "sat_testdata" / "sentinel2_truecolor_10m_crop1024.tif"
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
            _one_line(info.value, "zero or negative")
        with pytest.raises(UserInputError) as info:
            extent_to_window(src, (right + 10, bottom, right + 500, top))
        _one_line(info.value, "does not overlap", "EPSG:32618")
        with pytest.raises(UserInputError) as info:  # New York is not in this scene
            extent_to_window(src, (-72.4, 41.0, -72.3, 41.1), extent_crs="EPSG:4326")
        _one_line(info.value, "does not overlap")
        with pytest.raises(UserInputError):
            extent_to_window(src, (0, 0, 1), None)
        with pytest.raises(UserInputError):
            extent_to_window(src, (0, 0, 1, 1), "EPSG:999999")
    with RasterSource(PNG) as src:
        assert extent_to_window(src, (10, -60, 50, -20)) == Window(10, 20, 40, 40)
        with pytest.raises(UserInputError):
            extent_to_window(src, (0, 0, 1, 1), "EPSG:4326")


# ---------------------------------------------------------------------------------------------
# GeoJSON and GeoPackage
# ---------------------------------------------------------------------------------------------
def _records(src: RasterSource, tile_px: int = 256) -> list[TileRecord]:
    """A deterministic stand-in for the model: the caption describes the tile's mean colour."""
    out = []
    for t in plan_tiles(src, tile_px):
        read = src.read_tile(t.window, 224)
        mean = None if read.skipped else np.round(read.image.reshape(-1, 3).mean(0)).astype(int).tolist()
        caption = None if read.skipped else f"mean rgb {mean}"
        out.append(TileRecord.from_read(t.index, read, caption, src.ground_resolution_of(t.window),
                                        experts={"theme": "a scene"}, model_id="test", seconds=0.25))
    return out


def test_feature_collection_rfc7946() -> None:
    with RasterSource(RGB_BYTE) as src:
        records = _records(src)
        fc = feature_collection(list(reversed(records)), src, {"model_id": "test"})
    assert fc["type"] == "FeatureCollection" and "crs" not in fc
    assert fc["rsmoe"] == {"georeferenced": True, "coordinate_space": "EPSG:4326", "source_crs": "EPSG:32618",
                           "raster_size": [791, 718], "model_id": "test"}
    feats = fc["features"]
    assert [f["properties"]["tile_index"] for f in feats] == list(range(len(records))) == [f["id"] for f in feats]
    skipped = [f for f in feats if f["properties"]["skipped"]]
    assert skipped and all(f["properties"]["caption"] is None for f in skipped)
    assert {f["properties"]["skipped"] for f in skipped} >= {"only 48% valid pixels (minimum 50%)"}
    for f in feats:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        props = f["properties"]
        assert set(props) >= {"caption", "window", "tile_index", "ground_resolution_m", "skipped", "experts"}
        assert props["ground_resolution_m"] == pytest.approx(300.0, rel=0.01)
        geom = shape(f["geometry"])
        assert geom.is_valid and geom.exterior.is_ccw
        lon, lat = geom.centroid.x, geom.centroid.y  # the Bahamas
        assert -80 < lon < -75 and 23 < lat < 26
    json.loads(dumps_geojson(fc))  # strict JSON
    with pytest.raises(ValueError):
        TileRecord(0, Window(0, 0, 1, 1), caption="x", extra={"caption": "clash"})
    with pytest.raises(ValueError):
        TileRecord(0, Window(0, 0, 1, 1))


def test_write_geojson_atomic(tmp_path: Path) -> None:
    out = tmp_path / "tiles.geojson"
    with RasterSource(S2) as src:
        fc = feature_collection(_records(src), src)
    write_geojson_atomic(out, fc)
    assert json.loads(out.read_text()) == json.loads(json.dumps(fc))
    before = out.read_bytes()
    broken = dict(fc, features=fc["features"] + [{"type": "Feature", "properties": {"x": float("nan")}}])
    with pytest.raises(ValueError):
        write_geojson_atomic(out, broken)
    unserialisable = dict(fc, rsmoe={"oops": object()})
    with pytest.raises(TypeError):
        write_geojson_atomic(out, unserialisable)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles.geojson"]  # no temp file left
    with pytest.raises(UserInputError):
        write_geojson_atomic(tmp_path / "missing_dir" / "x.geojson", fc)


def test_write_gpkg_in_raster_crs(tmp_path: Path) -> None:
    import pyogrio

    out = tmp_path / "tiles.gpkg"
    with RasterSource(RGB_BYTE) as src:
        records = _records(src)
        write_gpkg(out, records, src)
        georef = src.georef
    info = pyogrio.read_info(out)
    assert info["features"] == len(records) and info["geometry_type"] == "Polygon"
    assert info["crs"] == "EPSG:32618"
    meta, _, geoms, fields = pyogrio.raw.read(out, return_fids=False)
    names = list(meta["fields"])
    captions = fields[names.index("caption")]
    skipped = fields[names.index("skipped")]
    assert [c is None for c in captions] == [r.caption is None for r in records]
    assert skipped[0] == records[0].skipped
    import shapely

    for wkb, rec in zip(geoms, records):
        np.testing.assert_allclose(shapely.from_wkb(wkb).bounds, footprint(georef, rec.window).bounds, atol=1e-6)
    assert json.loads(fields[names.index("experts")][0]) == {"theme": "a scene"}
    assert list(fields[names.index("window")][:1]) == [json.dumps(records[0].window.to_list())]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles.gpkg"]


# ---------------------------------------------------------------------------------------------
# journal and resume
# ---------------------------------------------------------------------------------------------
def _job(src: RasterSource, tiling: TilingParams, model_id: str = "rsmoe-lite") -> dict:
    return {"raster": raster_identity(src.path), "size": [src.width, src.height],
            "bands": list(src.band_indices), "tiling": tiling.to_dict(), "model_id": model_id}


def _run(output: Path, src: RasterSource, tiling: TilingParams, stop_after: int | None = None,
         resume: bool = True) -> dict | None:
    """A minimal batch loop as engine.jobs would run it; ``stop_after`` simulates a kill."""
    tiles = plan_tiles(src, tiling.tile_size, tiling.overlap, tiling.extent)
    journal = TileJournal.for_output(output, _job(src, tiling))
    done = journal.open(resume=resume)
    by_index = {r.tile_index: r for r in _records(src, int(tiling.tile_size.value))}
    for n, tile in enumerate(t for t in tiles if t.index not in done):
        if stop_after is not None and n == stop_after:
            # killed while writing the next line: half a JSON object, no newline
            journal._fh.write(b'{"tile_index": 7, "window": [0, 0, 2')
            journal._fh.flush()
            journal.close()
            return None
        journal.append(by_index[tile.index])
    fc = feature_collection(journal.records().values(), src, {"model_id": "rsmoe-lite"})
    write_geojson_atomic(output, fc)
    journal.close()
    return fc


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    tiling = TilingParams(parse_tile_size("128"), overlap=0)
    with RasterSource(S2) as src:
        straight = tmp_path / "a" / "out.geojson"
        straight.parent.mkdir()
        _run(straight, src, tiling)
        resumed = tmp_path / "b" / "out.geojson"
        resumed.parent.mkdir()
        assert _run(resumed, src, tiling, stop_after=5) is None
        assert not resumed.exists()
        header, records, _ = TileJournal(journal_path(resumed), {}).load()  # torn last line tolerated
        assert sorted(records) == [0, 1, 2, 3, 4] and header["model_id"] == "rsmoe-lite"
        _run(resumed, src, tiling)
    assert resumed.read_bytes() == straight.read_bytes()
    # the journal now holds the header and 16 complete lines: the torn bytes were cut off
    lines = journal_path(resumed).read_text().splitlines()
    assert len(lines) == 17 and all(json.loads(line) for line in lines)


def test_journal_refuses_a_different_job(tmp_path: Path) -> None:
    out = tmp_path / "out.geojson"
    with RasterSource(S2) as src:
        _run(out, src, TilingParams(parse_tile_size("256")), stop_after=2)
        journal = TileJournal.for_output(out, _job(src, TilingParams(parse_tile_size("128"))))
        with pytest.raises(JobError) as info:
            journal.open(resume=True)
        _one_line(info.value, "different job", "tile_size", "256px", "128px")
        other_model = TileJournal.for_output(out, _job(src, TilingParams(parse_tile_size("256")), "rsmoe-1b"))
        with pytest.raises(JobError):
            other_model.open()
        # starting afresh (no resume) replaces the journal
        assert journal.open(resume=False) == {}
        journal.close()
        header, records, _ = journal.load()
        assert header["tiling"]["tile_size"] == "128px" and records == {}


def test_journal_corrupt_middle_line_and_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "x.geojson.journal"
    job = {"model_id": "m"}
    with TileJournal(path, job) as journal:
        journal.open()
        journal.append(TileRecord(0, Window(0, 0, 4, 4), caption="a"))
        journal.append(TileRecord(1, Window(4, 0, 4, 4), skipped="no valid pixels (nodata)"))
    text = path.read_text().splitlines()
    path.write_text("\n".join([text[0], "{garbage", text[2]]) + "\n")
    with pytest.raises(JobError) as info:
        TileJournal(path, job).open()
    _one_line(info.value, "corrupt at line 2")
    path.write_text('{"type": "FeatureCollection"}\n')
    with pytest.raises(JobError):
        TileJournal(path, job).open()
    # a run killed while writing the header: nothing to resume, start afresh
    path.write_bytes(b'{"rsmoe_journal": 1, "jo')
    journal = TileJournal(path, job)
    assert journal.open() == {}
    journal.close()
    assert TileJournal(path, job).load()[0] == {"model_id": "m"}


def test_journal_records_are_durable_lines(tmp_path: Path) -> None:
    path = tmp_path / "j.journal"
    journal = TileJournal(path, {"k": 1})
    journal.open()
    rec = TileRecord(3, Window(0, 0, 8, 8), caption="houses along a road", valid_fraction=1.0,
                     ground_resolution_m=0.15, extra={"experts": {"objects": "12 houses"}, "seconds": 1.5})
    journal.append(rec)
    # visible to a reader before close (flushed and fsynced)
    header, records, _ = TileJournal(path, {"k": 1}).load()
    assert records == {3: rec}
    with pytest.raises(JobError):
        journal.append(TileRecord(4, Window(0, 0, 8, 8), caption="x", extra={"bad": float("nan")}))
    journal.close()
    with pytest.raises(JobError):
        journal.append(rec)
    journal.remove()
    assert not path.exists()
    assert os.listdir(tmp_path) == []
