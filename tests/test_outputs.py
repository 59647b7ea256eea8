"""engine.outputs and engine.journal on real rasters: GeoJSON / GeoPackage, resume journal."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Polygon, shape

from engine.errors import JobError, UserInputError
from engine.footprints import footprint
from engine.georef import Window
from engine.inputs import raster_identity
from engine.journal import TileJournal, journal_path
from engine.outputs import TileRecord, dumps_geojson, feature_collection, write_geojson_atomic, write_gpkg
from engine.raster import RasterSource
from engine.tiling import TilingParams, parse_tile_size, plan_tiles
from tests.raster_files import RGB_BYTE, S2, assert_one_line


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
        assert_one_line(info.value, "different job", "tile_size", "256px", "128px")
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
    assert_one_line(info.value, "corrupt at line 2")
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
