"""engine.jobs: batch annotation on real rasters (tiny random model), resume, cancel, the job manager."""
from __future__ import annotations

import json
import logging
import threading
import warnings
from pathlib import Path

import pytest
import rasterio
from pyproj import Transformer
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import xy
from shapely.geometry import shape

from engine.errors import CancelledError, InputNotFoundError, JobError, JobNotFoundError, RasterError, UserInputError
from engine.georef import Window
from engine.job_manager import JobManager
from engine.jobs import (DEFAULT_TILE_PX, AnnotateParams, JobProgress, check_annotation, default_tile_size,
                         run_annotation)
from engine.journal import journal_path
from engine.pipeline import ModelInfo, Pipeline
from tests.engine_helpers import DATA, S2, lite_ready, one_thread, tiny_dir  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def pipeline(tiny_dir: Path) -> Pipeline:  # noqa: F811
    return Pipeline.load(tiny_dir, device="cpu", batch_size=4)


def _load(path: Path) -> dict:
    fc = json.loads(path.read_text(encoding="utf-8"))
    assert fc["type"] == "FeatureCollection"
    return fc


def _open(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


def _check_footprints(fc: dict, raster: Path) -> None:
    """Every footprint has its window's four corners (from rasterio's geotransform, reprojected
    independently) as vertices, in lon/lat order."""
    with _open(raster) as ds:
        to_ll = Transformer.from_crs(ds.crs, "EPSG:4326", always_xy=True)
        for feature in fc["features"]:
            col, row, width, height = feature["properties"]["window"]
            poly = shape(feature["geometry"])
            assert poly.is_valid and poly.exterior.is_ccw
            vertices = list(poly.exterior.coords)
            for r, c in ((row, col), (row, col + width), (row + height, col + width), (row + height, col)):
                x, y = xy(ds.transform, r, c, offset="ul")
                lon, lat = to_ll.transform(x, y)
                assert min(abs(vx - lon) + abs(vy - lat) for vx, vy in vertices) < 3e-7, (feature["id"], lon, lat)


# ------------------------------------------------------------------------------------------- annotate
def test_annotate_sentinel2_valid_geojson_matching_the_geotransform(pipeline: Pipeline, tmp_path: Path) -> None:
    seen: list[JobProgress] = []
    out = tmp_path / "sub" / "s2.geojson"  # the folder is created
    result = run_annotation(pipeline, AnnotateParams(raster=str(S2), out=str(out), tile_size=128), seen.append)
    assert result.total == 16 and result.captioned == 16 and result.skipped == 0 and result.resumed == 0
    assert seen[0].done == 0 and seen[-1].done == seen[-1].total == 16
    assert not journal_path(out).exists(), "the journal is removed after success"
    fc = _load(out)
    assert fc["rsmoe"]["source_crs"] == "EPSG:32618" and fc["rsmoe"]["coordinate_space"] == "EPSG:4326"
    assert fc["rsmoe"]["model_id"] == "rsmoe-tiny" and fc["rsmoe"]["backend"] == "torch"
    assert [f["id"] for f in fc["features"]] == list(range(16))
    for f in fc["features"]:
        p = f["properties"]
        assert isinstance(p["caption"], str) and p["caption"].strip() and p["skipped"] is None
        assert len(p["window"]) == 4 and p["window"][2:] == [128, 128]
        assert p["segments"] and {"expert", "text"} <= set(p["segments"][0])
        assert p["model_id"] == "rsmoe-tiny" and p["backend"] == "torch" and p["tile_index"] == f["id"]
        assert 9.9 < p["ground_resolution_m"] < 10.1 and "seconds" not in p
        seen = p["ground_resolution_m"] * 128 / pipeline.image_size  # 128 px tiles read to the model input
        assert p["model_resolution_m"] == float(f"{seen:.3g}") and p["uncertain"] is False and p["uncertainty"] == []
        lon, lat = f["geometry"]["coordinates"][0][0]
        assert -76.0 < lon < -75.5 and 37.6 < lat < 37.8  # Virginia's Eastern Shore, lon first
    _check_footprints(fc, S2)


@pytest.mark.parametrize("name,tile,bands,expect_tiles", [
    ("world_rgb_4326.tif", "256", None, 2),
    ("usgs_3857.tif", "256", None, 4),
    ("s2_uint16_b02b03b04.tif", "128", "B04,B03,B02", 4),
    ("s2_float32_nan.tif", "128", None, 4),
    ("s2_gray.tif", "128", None, 4),
])
def test_annotate_crs_and_data_types(pipeline: Pipeline, tmp_path: Path, name: str, tile: str, bands: str | None,
                                     expect_tiles: int) -> None:
    out = tmp_path / "out.geojson"
    run_annotation(pipeline, AnnotateParams(raster=str(DATA / name), out=str(out), tile_size=tile, bands=bands))
    fc = _load(out)
    assert len(fc["features"]) == expect_tiles
    for f in fc["features"]:
        p = f["properties"]
        assert (p["caption"] is None) == (p["skipped"] is not None)
    _check_footprints(fc, DATA / name)


def test_nodata_tiles_are_skipped_with_a_reason(pipeline: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "collar.geojson"
    result = run_annotation(pipeline, AnnotateParams(raster=str(DATA / "rgb_byte_nodata.tif"), out=str(out),
                                                     tile_size=256))
    fc = _load(out)
    skipped = [f for f in fc["features"] if f["properties"]["skipped"]]
    assert result.skipped == len(skipped) > 0 and result.captioned > 0
    for f in skipped:
        assert f["properties"]["caption"] is None and "valid" in f["properties"]["skipped"]
        assert f["properties"]["segments"] is None and f["properties"]["scene_confidence"] is None
        assert f["properties"]["model_resolution_m"] is None and f["properties"]["uncertain"] is None
    float_out = tmp_path / "nan.geojson"
    run_annotation(pipeline, AnnotateParams(raster=str(DATA / "s2_float32_nan.tif"), out=str(float_out),
                                            tile_size=64))
    first = _load(float_out)["features"][0]["properties"]
    assert first["caption"] is None and first["skipped"] == "no valid pixels (nodata)"


@pytest.mark.parametrize("name", ["s2_plain.png", "s2_plain.jpg"])
def test_not_georeferenced_images_give_pixel_space_footprints(pipeline: Pipeline, tmp_path: Path, name: str) -> None:
    out = tmp_path / "plain.geojson"
    run_annotation(pipeline, AnnotateParams(raster=str(DATA / name), out=str(out), tile_size=128))
    fc = _load(out)
    assert fc["rsmoe"]["georeferenced"] is False and fc["rsmoe"]["coordinate_space"] == "pixel"
    assert len(fc["features"]) == 4
    second = fc["features"][1]
    assert second["properties"]["window"] == [128, 0, 128, 128]
    xs = [x for x, _ in second["geometry"]["coordinates"][0]]
    ys = [y for _, y in second["geometry"]["coordinates"][0]]
    assert (min(xs), max(xs), min(ys), max(ys)) == (128, 256, -128, 0)


def test_tile_larger_than_raster_metre_tiles_window_and_extent(pipeline: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "one.geojson"
    run_annotation(pipeline, AnnotateParams(raster=str(S2), out=str(out), tile_size=4096))
    assert [f["properties"]["window"] for f in _load(out)["features"]] == [[0, 0, 512, 512]]
    run_annotation(pipeline, AnnotateParams(raster=str(S2), out=str(out), tile_size="2560m"))  # 256 px at 10 m
    assert [f["properties"]["window"][2:] for f in _load(out)["features"]] == [[256, 256]] * 4
    run_annotation(pipeline, AnnotateParams(raster=str(S2), out=str(out), tile_size=100,
                                            window=Window(0, 0, 150, 140), overlap=20))
    assert [f["properties"]["window"] for f in _load(out)["features"]] == [
        [0, 0, 100, 100], [80, 0, 70, 100], [0, 80, 100, 60], [80, 80, 70, 60]]
    with _open(S2) as ds:
        to_ll = Transformer.from_crs(ds.crs, "EPSG:4326", always_xy=True)
        x0, y1 = xy(ds.transform, 0, 0, offset="ul")
    lon0, lat1 = to_ll.transform(x0 + 5, y1 - 5)
    lon1, lat0 = to_ll.transform(x0 + 1275, y1 - 1275)
    run_annotation(pipeline, AnnotateParams(raster=str(S2), out=str(out), tile_size=64,
                                            extent=(lon0, lat0, lon1, lat1), extent_crs="EPSG:4326"))
    windows = [f["properties"]["window"] for f in _load(out)["features"]]
    assert windows[0][:2] == [0, 0] and max(w[0] + w[2] for w in windows) <= 130


def test_geopackage_and_timing(pipeline: Pipeline, tmp_path: Path) -> None:
    import pyogrio

    out, gpkg = tmp_path / "t.geojson", tmp_path / "t.gpkg"
    result = run_annotation(pipeline, AnnotateParams(raster=str(S2), out=str(out), tile_size=256, gpkg=str(gpkg),
                                                     timing=True, keep_journal=True))
    assert result.gpkg == gpkg and result.journal == journal_path(out) and result.journal.exists()
    info = pyogrio.read_info(gpkg)
    assert info["features"] == 4 and "EPSG" in (info["crs"] or "") and "caption" in list(info["fields"])
    assert all(f["properties"]["seconds"] >= 0 for f in _load(out)["features"])


# ------------------------------------------------------------------------------------------- resume / cancel
class CancelAfter:
    """A cancel flag that sets itself after ``n`` progress reports."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.event = threading.Event()

    def progress(self, p: JobProgress) -> None:
        self.n -= 1
        if self.n <= 0:
            self.event.set()


def test_cancel_then_resume_is_byte_identical(pipeline: Pipeline, tmp_path: Path) -> None:
    reference = tmp_path / "reference.geojson"
    run_annotation(pipeline, AnnotateParams(raster=str(S2), out=str(reference), tile_size=96, batch_size=3))
    out = tmp_path / "resumed.geojson"
    out.write_text("OLD RESULT")
    params = AnnotateParams(raster=str(S2), out=str(out), tile_size=96, batch_size=3)
    stop = CancelAfter(3)  # the start report + two batches
    with pytest.raises(CancelledError, match="resume"):
        run_annotation(pipeline, params, stop.progress, stop.event)
    assert out.read_text() == "OLD RESULT", "a cancelled run never touches the output"
    assert not list(tmp_path.glob(".resumed.geojson.*")), "no temporary output left behind"
    journal_lines = journal_path(out).read_text().splitlines()
    assert len(journal_lines) == 1 + 6  # header + two batches of three tiles
    seen: list[JobProgress] = []
    result = run_annotation(pipeline, params, seen.append)
    assert result.resumed == 6 and seen[0].done == 6 and result.total == 25  # 5 x 5: the 32 px strips join
    assert out.read_bytes() == reference.read_bytes()


def test_torn_journal_line_and_partial_batch_resume_identically(pipeline: Pipeline, tmp_path: Path) -> None:
    reference = tmp_path / "reference.geojson"
    params = dict(raster=str(S2), tile_size=128, batch_size=4, keep_journal=True)
    run_annotation(pipeline, AnnotateParams(out=str(reference), **params))
    out = tmp_path / "torn.geojson"
    lines = journal_path(reference).read_bytes().splitlines(keepends=True)
    # a kill in the middle of a batch's appends, with a half-written last line
    journal_path(out).write_bytes(b"".join(lines[:7]) + lines[7][:20])
    result = run_annotation(pipeline, AnnotateParams(out=str(out), **params))
    assert result.resumed == 6
    assert out.read_bytes() == reference.read_bytes()


def test_journal_of_another_job_is_refused_unless_restart(pipeline: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "a.geojson"
    stop = CancelAfter(2)
    with pytest.raises(CancelledError):
        run_annotation(pipeline, AnnotateParams(raster=str(S2), out=str(out), tile_size=128), stop.progress, stop.event)
    other = AnnotateParams(raster=str(S2), out=str(out), tile_size=256)
    with pytest.raises(JobError, match="restart"):
        run_annotation(pipeline, other)
    result = run_annotation(pipeline, AnnotateParams(raster=str(S2), out=str(out), tile_size=256, restart=True))
    assert result.total == 4 and result.resumed == 0 and out.exists()


def test_failures_keep_existing_output_and_journal(pipeline: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "keep.geojson"
    out.write_text('{"previous": true}')
    with pytest.raises(RasterError, match="truncated_data.tif"):
        run_annotation(pipeline, AnnotateParams(raster=str(DATA / "truncated_data.tif"), out=str(out),
                                                tile_size=128, batch_size=2))
    assert out.read_text() == '{"previous": true}'
    assert len(journal_path(out).read_text().splitlines()) > 1, "tiles read before the failure stay journalled"
    bad = [
        (dict(raster=str(DATA / "missing.tif")), "not found"),
        (dict(raster=str(DATA / "not_a_raster.tif")), "cannot open"),
        (dict(raster=str(DATA / "truncated_header.tif")), "cannot open"),
        (dict(raster=str(S2), extent=(439300.0, 4172000.0, 439300.0, 4173000.0)), "zero"),
        (dict(raster=str(S2), extent=(0.0, 0.0, 10.0, 10.0)), "does not overlap"),
        (dict(raster=str(S2), overlap=128), "overlap"),
        (dict(raster=str(S2), style="poetic"), "style"),
        (dict(raster=str(S2), out=str(tmp_path)), "folder"),
    ]
    for kwargs, needle in bad:
        kwargs = {"out": str(out), "tile_size": 128, **kwargs}
        with pytest.raises(UserInputError) as exc:
            run_annotation(pipeline, AnnotateParams(**kwargs))
        assert needle in str(exc.value) and "\n" not in str(exc.value)
        assert out.read_text() == '{"previous": true}'
    with pytest.raises(UserInputError, match="tile size"):
        AnnotateParams(raster=str(S2), out=str(out), tile_size="12 furlongs")


# ------------------------------------------------------------------------------------------- job manager
def test_job_manager_lifecycle(pipeline: Pipeline, tmp_path: Path) -> None:
    manager = JobManager(pipeline)
    try:
        job = manager.submit(AnnotateParams(raster=str(S2), out=str(tmp_path / "m.geojson"), tile_size=128))
        assert job.total == 16 and job.state in ("queued", "running")
        manager.wait(job.id, timeout=120)
        status = manager.get(job.id).status()
        assert status["state"] == "done" and status["done"] == status["total"] == 16 and status["skipped"] == 0
        assert manager.result(job.id).out == tmp_path / "m.geojson"
        with pytest.raises(JobNotFoundError):
            manager.get("nope")
        with pytest.raises(InputNotFoundError):
            manager.submit(AnnotateParams(raster=str(DATA / "missing.tif"), out=str(tmp_path / "x.geojson")))
        assert len(manager.list()) == 1, "a refused job is not queued"
    finally:
        manager.shutdown()



def test_job_manager_cancel_and_failure(pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slow = Pipeline(pipeline.model, pipeline.info, batch_size=1)
    started = threading.Event()
    release = threading.Event()
    original = slow.caption_images

    def gated(*args, **kwargs):
        started.set()
        release.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(slow, "caption_images", gated)
    manager = JobManager(slow)
    try:
        out = tmp_path / "c.geojson"
        job = manager.submit(AnnotateParams(raster=str(S2), out=str(out), tile_size=128))
        queued = manager.submit(AnnotateParams(raster=str(S2), out=str(tmp_path / "q.geojson"), tile_size=128))
        with pytest.raises(JobError, match="already writing"):
            manager.submit(AnnotateParams(raster=str(S2), out=str(out), tile_size=128))
        assert started.wait(30)
        with pytest.raises(JobError, match="poll"):
            manager.result(job.id)
        manager.cancel(job.id)
        manager.cancel(queued.id)
        assert manager.get(queued.id).state == "cancelled"
        release.set()
        final = manager.wait(job.id, timeout=60)
        assert final.state == "cancelled" and 0 < final.done < final.total
        assert not out.exists() and journal_path(out).exists()
        with pytest.raises(JobError, match="cancelled"):
            manager.result(job.id)
        failing = manager.submit(AnnotateParams(raster=str(DATA / "truncated_data.tif"),
                                                out=str(tmp_path / "f.geojson"), tile_size=128))
        final = manager.wait(failing.id, timeout=60)
        assert final.state == "failed" and "truncated_data.tif" in final.error
        with pytest.raises(JobError, match="failed"):
            manager.result(failing.id)
    finally:
        release.set()
        manager.shutdown()


def test_check_annotation_needs_no_model(tmp_path: Path) -> None:
    plan = check_annotation(AnnotateParams(raster=str(S2), out=str(tmp_path / "o.geojson"), tile_size=100))
    assert len(plan.tiles) == 25 and plan.region == Window(0, 0, 512, 512)  # the 12 px strips join their tiles
    plan = check_annotation(AnnotateParams(raster=str(S2), out=str(tmp_path / "o.geojson")))  # no size, no model
    assert str(plan.tile_size) == f"{DEFAULT_TILE_PX}px" and len(plan.tiles) == 1 and plan.warnings == []


# ------------------------------------------------------------------------------------------- resolution-aware tiling
USGS = DATA / "usgs_3857.tif"  # 512 x 512, 0.1524 m on the ground: finer than the range below


@pytest.fixture(scope="module")
def conditioned(tiny_dir: Path) -> Pipeline:  # noqa: F811
    """The tiny model with a trained range of 0.3-12 m/px and a 20 m default footprint (seen at 20 / 32 px)."""
    from engine.model import RSMoEModel
    from engine.model.config import ResolutionConfig

    model = RSMoEModel.from_pretrained(tiny_dir)
    model.config.resolution = ResolutionConfig(prompt="Ground resolution {resolution} per pixel.", min_m=0.3,
                                               max_m=12.0, tile_m=20.0)
    return Pipeline(model, ModelInfo.of(model, "torch", tiny_dir), batch_size=4)


def test_default_tile_size_is_the_models_footprint_for_fine_imagery(conditioned: Pipeline, tmp_path: Path) -> None:
    from engine.raster import RasterSource

    config = conditioned.model.config
    with RasterSource(USGS) as fine, RasterSource(S2) as s2, RasterSource(DATA / "s2_plain.png") as plain:
        assert str(default_tile_size(fine, fine.full_window, config)) == "20m"
        assert str(default_tile_size(fine, fine.full_window, None)) == "512px"  # no model config: as before
        # 10 m pixels: too coarse for 20 m; 512 px would be seen at 10 m x 512 / size, coarser than 12 m: tiles of
        # the coarsest trained footprint (12 m x the input size), seen at 12 m
        size = config.image.image_size
        assert str(default_tile_size(s2, s2.full_window, config)) == f"{round(12.0 * size)}m"
        assert str(default_tile_size(plain, plain.full_window, config)) == "512px"  # no georeferencing
        config.resolution.max_m = 5.0  # pixels coarser than the whole trained range: no tile is seen in it
        assert str(default_tile_size(s2, s2.full_window, config)) == "512px"
        config.resolution.max_m = 12.0
    out = tmp_path / "fine.geojson"
    region = Window(0, 0, 262, 264)  # 2 x 2 tiles of 20 m (about 131 px at 0.1524 m)
    run_annotation(conditioned, AnnotateParams(raster=str(USGS), out=str(out), window=region))
    fc = _load(out)
    assert fc["rsmoe"]["tiling"]["tile_size"] == "20m" and len(fc["features"]) == 4
    size = conditioned.image_size
    for f in fc["features"]:
        p = f["properties"]
        width, height = p["window"][2:]
        assert 130 <= width <= 132 and 130 <= height <= 132  # 20 m of 0.1524 m pixels, whatever the pixel default
        assert 0.15 < p["ground_resolution_m"] < 0.155  # native
        seen = p["ground_resolution_m"] * max(width, height) / size
        assert p["model_resolution_m"] == float(f"{seen:.3g}") and 0.6 < seen < 0.65  # in range
        assert p["uncertain"] is False and p["uncertainty"] == []
    explicit = tmp_path / "explicit.geojson"  # an explicit size is kept, even a poor one
    run_annotation(conditioned, AnnotateParams(raster=str(USGS), out=str(explicit), window=Window(0, 0, 64, 32),
                                               tile_size=32))
    fc = _load(explicit)
    assert fc["rsmoe"]["tiling"]["tile_size"] == "32px" and len(fc["features"]) == 2
    for f in fc["features"]:
        p = f["properties"]  # 32 px of 0.15 m seen at 0.15 m/px: finer than 0.3 / 1.5
        assert p["uncertain"] is True and p["uncertainty"][0].startswith("resolution 0.152 m/px is finer than")


def test_tiles_outside_the_trained_range_log_a_warning_with_a_tile_size_in_metres(
        conditioned: Pipeline, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = conditioned.model.config
    out = str(tmp_path / "w.geojson")
    plan = check_annotation(AnnotateParams(raster=str(USGS), out=out, tile_size=32), config=config)
    assert str(plan.tile_size) == "32px" and len(plan.warnings) == 1
    warning = plan.warnings[0]
    assert "finer than its trained range 0.3-12 m/px" in warning
    assert "tiles of 9.6m to 384m would be in range, e.g. tile size 20m" in warning  # 0.3 and 12 m x 32 px
    plan = check_annotation(AnnotateParams(raster=str(USGS), out=out, tile_size="20m"), config=config)
    assert plan.warnings == []
    plan = check_annotation(AnnotateParams(raster=str(DATA / "rgb_byte_nodata.tif"), out=out, tile_size=256),
                            config=config)  # Landsat, 300 m pixels
    assert "coarser than its trained range" in plan.warnings[0] and "own pixels (300 m)" in plan.warnings[0]
    assert check_annotation(AnnotateParams(raster=str(USGS), out=out, tile_size=32)).warnings == []  # no config
    manager = JobManager(conditioned)
    try:
        job = manager.submit(AnnotateParams(raster=str(USGS), out=out, tile_size=32, window=Window(0, 0, 32, 32)))
        assert job.status()["warnings"] and job.status()["tile_size"] == "32px"
        caplog.set_level(logging.WARNING, logger="engine.jobs")
        assert manager.wait(job.id, timeout=120).state == "done"
        assert any("would be in range" in r.getMessage() for r in caplog.records if r.name == "engine.jobs")
        auto = manager.submit(AnnotateParams(raster=str(USGS), out=str(tmp_path / "auto.geojson")))
        assert auto.status()["tile_size"] == "20m" and auto.status()["warnings"] == [] and auto.total == 16
        manager.cancel(auto.id)
    finally:
        manager.shutdown()


# ------------------------------------------------------------------------------------------- real lite model
@pytest.mark.slow
def test_real_lite_model_annotates_the_sentinel2_crop(tmp_path: Path) -> None:
    if not lite_ready():
        pytest.skip("base weights not provisioned (rsmoe base-models)")
    lite = Pipeline.load(device="cpu", batch_size=4)
    lite.model.config.generation.max_new_tokens = 16  # keep the run short; real generated text all the same
    out = tmp_path / "lite.geojson"
    result = run_annotation(lite, AnnotateParams(raster=str(S2), out=str(out), tile_size=256))
    assert result.captioned == 4
    fc = _load(out)
    assert fc["rsmoe"]["model_id"] == "rsmoe-lite" and fc["rsmoe"]["model_variant"] == "lite"
    threshold = lite.model.config.vision.scene_min_confidence
    assert threshold > 0  # the embedded model gates unsure scenes out of its concise captions
    for f in fc["features"]:
        p = f["properties"]
        assert len(p["caption"].split()) >= 2  # real words from the real LM
        assert 0 < p["scene_confidence"] <= 1  # the scene head's probability, on every tile
        assert (p["scene"] is None) == (p["scene_confidence"] < threshold)
        assert p["scene"] is None or p["scene"] in lite.model.config.vision.scene_classes
        unsure = f"scene unsure ({p['scene_confidence']:.2f})"
        assert (unsure in p["uncertainty"]) == (p["scene_confidence"] < threshold)  # said, not hidden
        assert p["uncertain"] == bool(p["uncertainty"])
    _check_footprints(fc, S2)
