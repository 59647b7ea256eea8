"""engine.raster on real rasters (tests/data, made by tests/data/make_fixtures.py from CC0 scenes)."""
from __future__ import annotations

import json
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp
from rasterio.errors import RasterioError

from engine.bands import BandSelection, Stretch
from engine.errors import InputNotFoundError, RasterError
from engine.georef import Window
from engine.raster import RasterSource, TileRead

DATA = Path(__file__).resolve().parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "geotiff"

S2 = DATA / "s2_crop512.tif"  # Sentinel-2 true colour, 10 m, EPSG:32618, uint8
S2_U16 = DATA / "s2_uint16_b02b03b04.tif"  # same scene, uint16, bands B02 B03 B04 (blue, green, red)
S2_F32 = DATA / "s2_float32_nan.tif"  # same scene, float32 reflectance, NaN in the top-left 96 x 96
S2_GRAY = DATA / "s2_gray.tif"  # same scene, green band only
RGB_BYTE = DATA / "rgb_byte_nodata.tif"  # Landsat 7, 300 m, nodata=0 collar
WORLD = DATA / "world_rgb_4326.tif"  # EPSG:4326, 512 x 256
USGS = DATA / "usgs_3857.tif"  # USGS orthophoto, EPSG:3857, 0.1524 m on the ground
PNG = DATA / "s2_plain.png"
JPG = DATA / "s2_plain.jpg"


def _rasterio_rgb(path: Path, window: Window, bands: tuple[int, ...] = (1, 2, 3)) -> np.ndarray:
    with rasterio.open(path) as ds:
        return np.moveaxis(ds.read(list(bands), window=window.to_rasterio()), 0, -1)


def _assert_actionable(exc: Exception, *needles: str) -> None:
    """One line, names what matters, no traceback text, not a rasterio exception."""
    msg = str(exc)
    assert "\n" not in msg and "Traceback" not in msg
    assert not isinstance(exc, RasterioError)
    for needle in needles:
        assert needle in msg, (needle, msg)


# ---------------------------------------------------------------------------------------------
# opening, georeferencing, ground resolution
# ---------------------------------------------------------------------------------------------
def test_open_sentinel2_crop() -> None:
    with RasterSource(S2) as src:
        assert (src.width, src.height, src.count) == (512, 512, 3)
        assert src.georeferenced and src.georef.crs_string == "EPSG:32618"
        assert src.band_indices == (1, 2, 3) and src.dtype == "uint8"
        assert src.stretch is None  # uint8 is used as is
        with rasterio.open(S2) as ds:
            assert src.transform == ds.transform
        # UTM: 10 m grid, scale factor ~1.0004 here
        assert src.ground_resolution == pytest.approx(10.0, rel=2e-3)
        assert src.describe()["crs"] == "EPSG:32618"
    assert src.closed


def test_ground_resolution_web_mercator_is_true_ground_size() -> None:
    # EPSG:3857 pixels are 0.2022 "map metres" but 0.1524 m on the ground at 41 N (tiles.json: res_x .1524m)
    with RasterSource(USGS) as src:
        assert abs(src.transform.a) == pytest.approx(0.2022, rel=1e-3)
        assert src.ground_resolution == pytest.approx(0.1524, rel=0.01)


def test_ground_resolution_geographic() -> None:
    with RasterSource(WORLD) as src:
        assert src.georef.crs_string == "EPSG:4326"
        gx, gy = src.ground_resolution_xy
        # 0.703125 degree at the equator (raster centre)
        assert gx == pytest.approx(0.703125 * 111_319.49, rel=1e-3)
        assert gy == pytest.approx(0.703125 * 110_574.4, rel=2e-3)
        # further north the columns get narrower: per-window ground resolution follows
        north = src.ground_resolution_of(Window(0, 0, 64, 64))  # 67.5..90 N
        assert north < src.ground_resolution


def test_read_tile_native_equals_rasterio() -> None:
    window = Window(128, 256, 200, 100)
    with RasterSource(S2) as src:
        tile = src.read_tile(window, out_size=None)
    assert isinstance(tile, TileRead) and tile.ok and tile.window == window
    assert tile.image.shape == (100, 200, 3) and tile.image.dtype == np.uint8
    np.testing.assert_array_equal(tile.image, _rasterio_rgb(S2, window))
    assert tile.valid_fraction == 1.0 and tile.valid_mask.all()


def test_read_tile_resampled_to_model_size() -> None:
    with RasterSource(S2) as src:
        tile = src.read_tile(Window(0, 0, 512, 512), 224)
        rect = src.read_tile(Window(0, 0, 300, 200), (112, 168))
    assert tile.image.shape == (224, 224, 3) and tile.image.dtype == np.uint8
    assert rect.image.shape == (112, 168, 3)
    # a faithful downsample: the mean colour is kept
    ref = _rasterio_rgb(S2, Window(0, 0, 512, 512)).reshape(-1, 3).mean(0)
    np.testing.assert_allclose(tile.image.reshape(-1, 3).mean(0), ref, atol=1.0)


def test_read_overview_keeps_aspect_and_never_upsamples() -> None:
    with RasterSource(RGB_BYTE) as src:  # 791 x 718
        ov = src.read_overview(max_size=100)
        assert ov.image.shape == (91, 100, 3) and ov.ok
        assert 0.5 < ov.valid_fraction < 0.8  # the nodata collar is part of the layer
        small = src.read_overview(Window(300, 300, 50, 40), max_size=512)
        assert small.image.shape == (40, 50, 3)
        np.testing.assert_array_equal(small.image, _rasterio_rgb(RGB_BYTE, Window(300, 300, 50, 40)))
        nothing = src.read_overview(Window(780, 0, 11, 100))  # all collar
        assert not nothing.ok and nothing.image is None and "no valid" in nothing.skipped


# ---------------------------------------------------------------------------------------------
# band choice
# ---------------------------------------------------------------------------------------------
def test_band_selection_parse() -> None:
    assert BandSelection.parse("4,3,2") == BandSelection(indices=(4, 3, 2))
    assert BandSelection.parse(" B04, B03 ,B02") == BandSelection(names=("B04", "B03", "B02"))
    assert BandSelection.parse([2]) == BandSelection(indices=(2,))
    assert BandSelection.parse(None) == BandSelection() == BandSelection.parse("")
    with pytest.raises(RasterError):
        BandSelection.parse("1,2")
    with pytest.raises(RasterError):
        BandSelection(indices=(0, 1, 2))
    with pytest.raises(RasterError):
        BandSelection(indices=(1,), names=("red",))


def test_bands_by_description_give_rgb_from_b02_b03_b04() -> None:
    with RasterSource(S2_U16, BandSelection.parse("B04,B03,B02")) as src:
        assert src.band_indices == (3, 2, 1) and src.dtype == "uint16"
        img = src.read_tile(Window(0, 0, 256, 256), None).image
        stretch = src.stretch
    with rasterio.open(S2_U16) as ds:
        raw = ds.read()
    np.testing.assert_array_equal(np.moveaxis(img, -1, 0), stretch.apply(raw[::-1]))
    ref = _rasterio_rgb(S2, Window(0, 0, 256, 256)).astype(float)
    for c in range(3):  # the stretched channel c follows the original red / green / blue
        assert np.corrcoef(img[..., c].ravel(), ref[..., c].ravel())[0, 1] > 0.95


def test_bands_by_colour_interpretation_and_default(tmp_path: Path) -> None:
    with RasterSource(S2, BandSelection(names=("red", "green", "blue"))) as src:
        assert src.band_indices == (1, 2, 3)
    # a raster stored as B, G, R with colour interpretation: the default picks R, G, B
    bgr = tmp_path / "bgr.tif"
    with rasterio.open(S2) as ds:
        profile = ds.profile
        data = ds.read()[::-1]
    with rasterio.open(bgr, "w", **profile) as dst:
        dst.write(data)
        dst.colorinterp = (ColorInterp.blue, ColorInterp.green, ColorInterp.red)
    with RasterSource(bgr) as src:
        assert src.band_indices == (3, 2, 1)
        np.testing.assert_array_equal(src.read_tile(Window(0, 0, 64, 64), None).image,
                                      _rasterio_rgb(S2, Window(0, 0, 64, 64)))
    # no colour interpretation (uint16 fixture): first three bands
    with RasterSource(S2_U16) as src:
        assert src.band_indices == (1, 2, 3)


def test_bad_band_choice_is_a_raster_error() -> None:
    with pytest.raises(RasterError) as info:
        RasterSource(S2, BandSelection(indices=(4, 3, 2)))
    _assert_actionable(info.value, "3 band", "4")
    with pytest.raises(RasterError) as info:
        RasterSource(S2_U16, BandSelection(names=("B08",)))
    _assert_actionable(info.value, "B08", "B02")


def test_single_band_replicated_to_rgb() -> None:
    window = Window(0, 0, 256, 256)
    with RasterSource(S2_GRAY) as gray:
        assert gray.band_indices == (1, 1, 1)
        g = gray.read_tile(window, None).image
    assert g.shape == (256, 256, 3)
    np.testing.assert_array_equal(g[..., 0], g[..., 1])
    np.testing.assert_array_equal(g[..., 0], g[..., 2])
    # the grey fixture is the green band of the Sentinel-2 crop: choosing band 2 there gives the same
    with RasterSource(S2, BandSelection(indices=(2,))) as src:
        np.testing.assert_array_equal(src.read_tile(window, None).image, g)


def test_paletted_band_expands_through_its_colour_table(tmp_path: Path) -> None:
    path = tmp_path / "palette.tif"
    with rasterio.open(S2_GRAY) as ds:
        profile = dict(ds.profile, photometric="palette")
        data = ds.read(1) // 64  # 4 classes 0..3
    cmap = {0: (0, 0, 0, 255), 1: (255, 0, 0, 255), 2: (0, 255, 0, 255), 3: (0, 0, 255, 255)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
        dst.write_colormap(1, cmap)
    with RasterSource(path) as src:
        img = src.read_tile(Window(0, 0, 256, 256), None).image
    expected = np.array([cmap[i][:3] for i in range(4)], dtype=np.uint8)[data]
    np.testing.assert_array_equal(img, expected)


# ---------------------------------------------------------------------------------------------
# stretch
# ---------------------------------------------------------------------------------------------
def test_uint16_stretch_is_global_and_computed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = RasterSource._compute_stretch

    def counting(self: RasterSource) -> Stretch:
        calls.append(1)
        return original(self)

    monkeypatch.setattr(RasterSource, "_compute_stretch", counting)
    left_w, right_w = Window(0, 0, 128, 128), Window(128, 0, 128, 128)
    with RasterSource(S2_U16) as src:
        left = src.read_tile(left_w, None).image
        right = src.read_tile(right_w, None).image
        stretch = src.stretch
    assert len(calls) == 1
    # the statistics are the 2nd / 98th percentiles of the whole raster's valid pixels
    with rasterio.open(S2_U16) as ds:
        raw = ds.read()
        raw_left, raw_right = raw[:, :128, :128], raw[:, :128, 128:256]
    for b in range(3):
        lo, hi = np.percentile(raw[b][raw[b] != 0], [2, 98])
        assert stretch.lo[b] == pytest.approx(lo) and stretch.hi[b] == pytest.approx(hi)
    # the same raw value gives the same uint8 in both tiles (a per-tile stretch would not)
    for b in range(3):
        common = np.intersect1d(raw_left[b], raw_right[b])
        assert common.size > 10
        for value in common[:: max(1, common.size // 20)]:
            lv = np.unique(left[..., b][raw_left[b] == value])
            rv = np.unique(right[..., b][raw_right[b] == value])
            assert lv.size == 1 and np.array_equal(lv, rv)
    assert left.min() == 0 and left.max() >= 250 or right.max() >= 250


def test_stretch_can_be_given_back() -> None:
    fixed = Stretch((500.0, 500.0, 500.0), (10700.0, 10700.0, 10700.0))
    with RasterSource(S2_U16, stretch=fixed) as src:
        assert src.stretch is fixed
        img = src.read_tile(Window(0, 0, 32, 32), None).image
    with rasterio.open(S2_U16) as ds:
        raw = ds.read(window=Window(0, 0, 32, 32).to_rasterio())
    expected = np.rint((raw.astype(np.float64) - 500.0) * 255.0 / 10200.0).astype(np.uint8)
    np.testing.assert_array_equal(np.moveaxis(img, -1, 0), expected)
    assert Stretch.from_dict(json.loads(json.dumps(fixed.to_dict()))) == fixed


def test_float32_with_nan_nodata() -> None:
    with RasterSource(S2_F32) as src:
        assert src.dtype == "float32"
        s = src.stretch
        assert all(np.isfinite(s.lo)) and all(np.isfinite(s.hi)) and all(hi > lo for lo, hi in zip(s.lo, s.hi))
        corner = src.read_tile(Window(0, 0, 128, 128), None)  # 96x96 of 128x128 is NaN: 44% valid
        assert not corner.ok and corner.image is None
        assert corner.valid_fraction == pytest.approx(1 - 96 * 96 / 128**2)
        assert "44%" in corner.skipped and "50%" in corner.skipped
        tile = src.read_tile(Window(0, 0, 256, 256), None)
        assert tile.ok and tile.valid_fraction == pytest.approx(1 - 96 * 96 / 256**2)
        assert not tile.valid_mask[:96, :96].any() and tile.valid_mask[96:, :].all()
        assert (tile.image[:96, :96] == 0).all()
        # the valid part follows the original scene
        ref = _rasterio_rgb(S2, Window(0, 0, 256, 256))
        assert np.corrcoef(tile.image[96:, :, 1].ravel(), ref[96:, :, 1].ravel())[0, 1] > 0.95


# ---------------------------------------------------------------------------------------------
# nodata and masks
# ---------------------------------------------------------------------------------------------
def test_nodata_collar_tiles_are_skipped_with_a_reason() -> None:
    with RasterSource(RGB_BYTE) as src, rasterio.open(RGB_BYTE) as ds:
        mask = ds.dataset_mask() > 0
        top_left = src.read_tile(Window(0, 0, 256, 256), None)
        assert not top_left.ok and top_left.image is None
        assert top_left.valid_fraction == pytest.approx(mask[:256, :256].mean())
        assert top_left.skipped == "only 48% valid pixels (minimum 50%)"
        edge = src.read_tile(Window(768, 0, 23, 256), None)  # 15 valid pixels of 5888
        assert not edge.ok and edge.skipped == "only 0.25% valid pixels (minimum 50%)"
        collar = src.read_tile(Window(780, 0, 11, 256), 224)
        assert not collar.ok and collar.valid_fraction == 0.0 and collar.skipped == "no valid pixels (nodata)"
        inner = src.read_tile(Window(256, 256, 256, 256), 224)
        assert inner.ok and inner.valid_fraction > 0.99 and inner.image.shape == (224, 224, 3)
        part = src.read_tile(Window(512, 256, 256, 256), None)
        assert part.ok and part.valid_fraction == pytest.approx(mask[256:512, 512:768].mean())
        np.testing.assert_array_equal(part.valid_mask, mask[256:512, 512:768])
        assert (part.image[~part.valid_mask] == 0).all()
    with RasterSource(RGB_BYTE, min_valid_fraction=0.4) as lenient:
        assert lenient.read_tile(Window(0, 0, 256, 256), 224).ok
    with pytest.raises(RasterError):
        RasterSource(RGB_BYTE, min_valid_fraction=1.5)


# ---------------------------------------------------------------------------------------------
# rasters without georeferencing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [PNG, JPG])
def test_png_jpeg_without_georeferencing(path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with RasterSource(path) as src:
            assert not src.georeferenced and src.crs is None
            assert src.ground_resolution is None and src.georef.crs_string is None
            assert src.transform.e == -1.0  # pixel space: x = col, y = -row
            tile = src.read_tile(Window(0, 0, 256, 256), None)
            model = src.read_tile(Window(64, 64, 128, 128), 224)
    assert not [w for w in caught if "georeferenc" in str(w.message).lower()]
    assert tile.ok and model.image.shape == (224, 224, 3)
    ref = _rasterio_rgb(S2, Window(0, 0, 256, 256))
    if path.suffix == ".png":  # lossless
        np.testing.assert_array_equal(tile.image, ref)
    else:
        assert np.abs(tile.image.astype(int) - ref).mean() < 6


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_missing_path() -> None:
    missing = DATA / "no_such_scene.tif"
    with pytest.raises(InputNotFoundError) as info:
        RasterSource(missing)
    _assert_actionable(info.value, "no_such_scene.tif", "not found")


@pytest.mark.parametrize("name", ["not_a_raster.tif", "truncated_header.tif"])
def test_unreadable_files_raise_raster_error(name: str) -> None:
    with pytest.raises(RasterError) as info:
        RasterSource(DATA / name)
    assert type(info.value) is RasterError
    _assert_actionable(info.value, name, "cannot open")


def test_read_failure_mid_file() -> None:
    with RasterSource(DATA / "truncated_data.tif") as src:
        assert src.read_tile(Window(0, 0, 128, 128), None).ok  # the first tiles are intact
        with pytest.raises(RasterError) as info:
            src.read_tile(Window(384, 384, 128, 128), 224)
    _assert_actionable(info.value, "truncated_data.tif", "[384, 384, 128, 128]", "truncated")
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_directory_and_bad_windows(tmp_path: Path) -> None:
    with pytest.raises(RasterError):
        RasterSource(tmp_path)
    with RasterSource(S2) as src:
        with pytest.raises(RasterError) as info:
            src.read_tile(Window(500, 0, 100, 100), 224)
        _assert_actionable(info.value, "outside", "512 x 512")
        with pytest.raises(RasterError):
            src.read_tile(Window(0, 0, 10, 10), 0)
    with pytest.raises(RasterError):
        Window(0, 0, 0, 10)
    with pytest.raises(RasterError):
        Window(-1, 0, 10, 10)
    assert Window.from_list([1, 2, 3, 4]).to_list() == [1, 2, 3, 4]
    assert Window(0, 0, 10, 10).intersection(Window(5, 5, 10, 10)) == Window(5, 5, 5, 5)
    assert Window(0, 0, 10, 10).intersection(Window(10, 0, 5, 5)) is None


# ---------------------------------------------------------------------------------------------
# memory: bounded by the tile, not the raster
# ---------------------------------------------------------------------------------------------
def _mosaic_vrt(tmp_path: Path, source: Path, reps: int, dtype: str) -> Path:
    """An 8192 x 8192 VRT tiling the 512 x 512 Sentinel-2 crop 16 x 16 times (real pixels)."""
    with rasterio.open(source) as ds:
        size, t = ds.width, ds.transform
    full = size * reps
    bands = []
    for b in range(1, 4):
        srcs = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="0">{source}</SourceFilename>'
            f"<SourceBand>{b}</SourceBand>"
            f'<SrcRect xOff="0" yOff="0" xSize="{size}" ySize="{size}"/>'
            f'<DstRect xOff="{c * size}" yOff="{r * size}" xSize="{size}" ySize="{size}"/></SimpleSource>'
            for r in range(reps) for c in range(reps)
        )
        bands.append(f'<VRTRasterBand dataType="{dtype}" band="{b}"><NoDataValue>0</NoDataValue>{srcs}</VRTRasterBand>')
    with rasterio.open(source) as ds:
        wkt = ds.crs.to_wkt()
    xml = (
        f'<VRTDataset rasterXSize="{full}" rasterYSize="{full}"><SRS>{wkt}</SRS>'
        f"<GeoTransform>{t.c}, {t.a}, 0, {t.f}, 0, {t.e}</GeoTransform>{''.join(bands)}</VRTDataset>"
    )
    path = tmp_path / f"mosaic_{dtype}.vrt"
    path.write_text(xml)
    return path


@pytest.mark.parametrize("dtype", ["Byte", "UInt16"])
def test_reading_a_tile_of_a_big_raster_reads_only_the_tile(tmp_path: Path, dtype: str) -> None:
    vrt = _mosaic_vrt(tmp_path, S2, 16, dtype)
    full_bytes = 8192 * 8192 * 3 * (1 if dtype == "Byte" else 2)  # 192 / 384 MiB
    with RasterSource(vrt) as src:
        assert (src.width, src.height) == (8192, 8192)
        tracemalloc.start()
        try:
            tile = src.read_tile(Window(4096 + 100, 4096 + 200, 512, 512), None)
            model = src.read_tile(Window(7680, 7680, 512, 512), 224)
            overview = src.read_overview(max_size=256)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert tile.image.shape == (512, 512, 3) and tile.image.nbytes == 512 * 512 * 3
    assert model.image.shape == (224, 224, 3) and overview.image.shape == (256, 256, 3)
    assert peak < 80 * 2**20 < full_bytes / 2, peak  # the stretch sample is at most 1024 x 1024
    if dtype == "Byte":  # the pixels are the Sentinel-2 crop's, wrapped every 512 px
        np.testing.assert_array_equal(
            tile.image[:312, :412], _rasterio_rgb(S2, Window(100, 200, 412, 312)))


# ---------------------------------------------------------------------------------------------
# optional: the full shared scenes, when ../shared/data is beside the repository
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_shared_scenes_open_and_read() -> None:
    for path in [SHARED / "sat_testdata" / "sentinel2_truecolor_10m_crop1024.tif",
                 SHARED / "sat_testdata" / "landsat8_truecolor_30m.tif", SHARED / "RGB.byte.tif"]:
        with RasterSource(path) as src:
            tile = src.read_tile(Window(256, 256, 256, 256), 224)
            assert tile.ok and tile.image.shape == (224, 224, 3)
            assert src.ground_resolution == pytest.approx(abs(src.transform.a), rel=2e-3)
