"""engine.pipeline on a tiny random model and real rasters: inputs, regions, batching, the feature cache."""
from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import xy

from engine.errors import InputNotFoundError, RasterError, UserInputError
from engine.pipeline import FeatureCache, ImageInput, ModelInfo, Pipeline, check_input
from engine.raster import BandSelection, Window
from tests.engine_helpers import DATA, S2, one_thread, tiny_dir  # noqa: F401 - fixtures


class Spy:
    """Counts calls of a model method and how many run at the same time."""

    def __init__(self, obj: object, name: str, delay: float = 0.0) -> None:
        self.calls = 0
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        original = getattr(obj, name)

        def wrapper(*args, **kwargs):
            with self._lock:
                self.calls += 1
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            try:
                if delay:
                    time.sleep(delay)
                return original(*args, **kwargs)
            finally:
                with self._lock:
                    self.active -= 1

        setattr(obj, name, wrapper)


@pytest.fixture(scope="module")
def pipeline(tiny_dir: Path) -> Pipeline:  # noqa: F811
    return Pipeline.load(tiny_dir, device="cpu", batch_size=2)


@pytest.fixture()
def fresh(pipeline: Pipeline) -> Pipeline:
    """The module's model in a new pipeline (empty cache, zero counters)."""
    return Pipeline(pipeline.model, pipeline.info, batch_size=2)


def _one_line(exc: BaseException, *needles: str) -> None:
    msg = str(exc)
    assert "\n" not in msg and "Traceback" not in msg and "/vsimem" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


# ------------------------------------------------------------------------------------------- inputs
def test_image_input_validation() -> None:
    with pytest.raises(UserInputError, match="exactly one"):
        ImageInput()
    with pytest.raises(UserInputError, match="exactly one"):
        ImageInput(path="a.tif", data=b"x")
    with pytest.raises(UserInputError, match="empty"):
        ImageInput(data=b"")
    with pytest.raises(UserInputError, match="not both"):
        ImageInput(path="a.tif", window=Window(0, 0, 1, 1), extent=(0, 0, 1, 1))
    with pytest.raises(UserInputError, match="without an extent"):
        ImageInput(path="a.tif", extent_crs="EPSG:4326")
    with pytest.raises(UserInputError, match="minx"):
        ImageInput(path="a.tif", extent=(0, 0, 1))  # type: ignore[arg-type]
    inp = ImageInput.of(S2, window=[0, 0, 10, 10], bands="3,2,1")  # type: ignore[arg-type]
    assert inp.window == Window(0, 0, 10, 10) and inp.bands == BandSelection(indices=(3, 2, 1))
    assert ImageInput.of(b"abc").data == b"abc"


def test_model_info(pipeline: Pipeline) -> None:
    info = pipeline.info.to_dict()
    assert info["model_id"] == "rsmoe-tiny" and info["backend"] == "torch" and info["device"] == "cpu"
    assert info["providers"] == ["cpu"] and info["gpu"] is False and info["trained"] is True
    assert info["dtype"] == "float32" and len(info["fingerprint"]) == 16 and info["version"]
    assert ModelInfo.of(pipeline.model).fingerprint != ""


# ------------------------------------------------------------------------------------------- caption / ask
def test_caption_whole_raster_structure(fresh: Pipeline) -> None:
    res = fresh.caption(S2, style="detailed")
    d = res.to_dict()
    assert isinstance(d["text"], str) and d["task"] == "caption" and d["style"] == "detailed"
    assert d["window"] == [0, 0, 512, 512] and d["source"]["crs"] == "EPSG:32618"
    assert [s["expert"] for s in d["segments"]] == ["theme", "objects", "relations"]
    assert d["cached"] is False and d["router"] in ("generative", "template")


def test_whole_layer_caption_reads_a_downsampled_overview(fresh: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.raster import RasterSource

    shapes = []
    original = RasterSource.read_overview

    def spy(self, window=None, max_size=512, min_valid_fraction=0.0):
        out = original(self, window, max_size, min_valid_fraction)
        shapes.append(out.image.shape)
        return out

    monkeypatch.setattr(RasterSource, "read_overview", spy)
    fresh.caption(S2)
    assert shapes == [(fresh.image_size, fresh.image_size, 3)]  # 512 x 512 read at the model input size


def test_follow_up_question_skips_the_vision_encoder(fresh: Pipeline) -> None:
    spy = Spy(fresh.model, "encode_images")
    with rasterio.open(S2) as ds:
        left, bottom, right, top = ds.bounds
        to_ll = Transformer.from_crs(ds.crs, "EPSG:4326", always_xy=True)
    lon0, lat0 = to_ll.transform(left + 1000, bottom + 1000)
    lon1, lat1 = to_ll.transform(left + 3000, bottom + 3000)
    extent = dict(extent=(lon0, lat0, lon1, lat1), extent_crs="EPSG:4326")
    first = fresh.caption(S2, **extent)
    assert spy.calls == 1 and first.cached is False
    answer = fresh.ask(S2, "how many fields are there?", **extent)
    again = fresh.ask(S2, "is this area rural or urban?", **extent)
    assert spy.calls == 1, "the follow-up questions must reuse the cached visual features"
    assert answer.cached and again.cached and answer.window == first.window
    assert answer.result.task == "ask" and isinstance(answer.text, str)
    fresh.ask(S2, "how many fields are there?", window=Window(0, 0, 100, 100))  # another region: encoded
    assert spy.calls == 2
    assert fresh.cache.stats()["hits"] >= 2


def test_window_and_extent_select_the_same_pixels(fresh: Pipeline) -> None:
    with rasterio.open(S2) as ds:
        t = ds.transform
    window = Window(64, 128, 200, 100)
    x0, y1 = xy(t, 128, 64, offset="ul")
    x1, y0 = xy(t, 228, 264, offset="ul")
    by_extent = check_input(ImageInput(path=str(S2), extent=(x0, y0, x1, y1)))
    assert by_extent == window == check_input(ImageInput(path=str(S2), window=window))


@pytest.mark.parametrize("name,bands", [
    ("world_rgb_4326.tif", None), ("usgs_3857.tif", None), ("s2_uint16_b02b03b04.tif", "B04,B03,B02"),
    ("s2_float32_nan.tif", None), ("s2_gray.tif", None), ("rgb_byte_nodata.tif", None),
    ("s2_plain.png", None), ("s2_plain.jpg", None),
])
def test_caption_any_raster(fresh: Pipeline, name: str, bands: str | None) -> None:
    res = fresh.caption(ImageInput(path=str(DATA / name), bands=BandSelection.parse(bands)))
    assert isinstance(res.text, str) and res.result.segments
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        ds = rasterio.open(DATA / name)
    with ds:
        assert res.window == Window(0, 0, ds.width, ds.height)


def test_image_bytes_png_jpeg_geotiff(fresh: Pipeline) -> None:
    spy = Spy(fresh.model, "encode_images")
    for name in ("s2_plain.png", "s2_plain.jpg", "s2_crop512.tif"):
        data = (DATA / name).read_bytes()
        res = fresh.caption(data)
        assert isinstance(res.text, str) and res.source["path"] is None
        assert res.source["georeferenced"] is (name.endswith(".tif"))
        again = fresh.ask(data, "what is this?")
        assert again.cached
    assert spy.calls == 3  # the same bytes hash to the same cache key


def test_ask_about_a_window_of_bytes(fresh: Pipeline) -> None:
    res = fresh.ask((DATA / "s2_plain.png").read_bytes(), "is there water?", window=Window(0, 0, 128, 64))
    assert res.window == Window(0, 0, 128, 64)


def test_tile_larger_than_raster_is_read_whole(fresh: Pipeline) -> None:
    res = fresh.caption(DATA / "s2_gray.tif", window=Window(0, 0, 256, 256))
    assert res.window == Window(0, 0, 256, 256)


def test_scene_logits_of_the_views_are_cached_with_the_tokens(tiny_dir: Path) -> None:  # noqa: F811
    """With a scene head over 8 views, the pipeline keeps each image's averaged scene logits next to its tokens:
    a cached image gets the same scene without running the encoder again."""
    import torch

    from engine.model import RSMoEModel

    model = RSMoEModel.from_pretrained(tiny_dir)
    torch.manual_seed(1)
    model.set_scene_head(["beach", "forest", "harbor"], torch.nn.Linear(model.vision.num_features, 3))
    model.config.vision.scene_views = 8
    assert model.router_kind == "generative"  # its plans take their scene from the head
    model.trained_adapters.discard("router")
    assert model.encode([np.zeros((40, 40, 3), np.uint8)])[1] is None  # the template router names no scene
    model.trained_adapters.add("router")
    pipe = Pipeline(model, ModelInfo.of(model, "torch", tiny_dir), batch_size=2)
    spy = Spy(model, "encode_images")
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
    visual, logits = pipe.encode(images, keys=["a", "b", "c"])
    assert spy.calls == 4  # two batches, each: the image, then its 7 other views
    expected_visual, expected_logits = model.encode(images)
    assert torch.equal(visual, expected_visual) and torch.equal(logits, expected_logits)
    assert not torch.allclose(logits, model.scene_logits(visual))  # the views, not the image alone
    calls = spy.calls
    again_visual, again_logits = pipe.encode(images[1:], keys=["b", "c"])
    assert spy.calls == calls and torch.equal(again_logits, logits[1:]) and torch.equal(again_visual, visual[1:])
    assert pipe.cache.nbytes == visual.element_size() * visual.nelement() + logits.element_size() * logits.nelement()


def test_batching_and_chunked_encoder_calls(fresh: Pipeline) -> None:
    spy = Spy(fresh.model, "encode_images")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(5)]
    results = fresh.caption_images(images, "concise")
    assert len(results) == 5 and spy.calls == 3  # batch size 2
    assert all(r.style == "concise" and len(r.segments) == 1 for r in results)
    inputs = [DATA / "s2_plain.png", DATA / "s2_gray.tif", S2]
    out = fresh.caption_batch(inputs)
    assert [r.source["width"] for r in out] == [256, 256, 512]


def test_model_calls_are_serialised_across_threads(fresh: Pipeline) -> None:
    enc = Spy(fresh.model, "encode_images", delay=0.02)
    gen = Spy(fresh.model, "generate_texts", delay=0.02)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            fresh.ask(S2, f"question {i}?", window=Window(i * 10, 0, 64, 64))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert enc.calls == 4 and enc.max_active == 1 and gen.max_active == 1


# ------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors(fresh: Pipeline) -> None:
    spy = Spy(fresh.model, "encode_images")
    with pytest.raises(InputNotFoundError) as exc:
        fresh.caption(DATA / "missing.tif")
    _one_line(exc.value, "missing.tif")
    for name in ("not_a_raster.tif", "truncated_header.tif"):
        with pytest.raises(RasterError) as exc:
            fresh.caption(DATA / name)
        _one_line(exc.value, name)
    with pytest.raises(RasterError) as exc:
        fresh.caption(b"this is not an image")
    _one_line(exc.value, "image bytes")
    with pytest.raises(UserInputError) as exc:
        fresh.caption(S2, extent=(439300.0, 4172000.0, 439300.0, 4173000.0))
    _one_line(exc.value, "zero")
    with pytest.raises(UserInputError) as exc:
        fresh.caption(S2, extent=(-10.0, 40.0, -9.0, 41.0), extent_crs="EPSG:4326")
    _one_line(exc.value, "does not overlap")
    with pytest.raises(RasterError) as exc:
        fresh.caption(S2, window=Window(500, 500, 100, 100))
    _one_line(exc.value, "outside")
    with pytest.raises(UserInputError) as exc:
        fresh.ask(S2, "x" * 10_000)
    _one_line(exc.value, "10000 characters")
    with pytest.raises(UserInputError):
        fresh.ask(S2, "   ")
    with pytest.raises(UserInputError, match="style"):
        fresh.caption(S2, style="poetic")
    assert spy.calls == 0, "bad input must fail before the model runs"


def test_all_nodata_region_is_an_error(fresh: Pipeline) -> None:
    with pytest.raises(RasterError, match="no valid pixels"):
        fresh.caption(DATA / "s2_float32_nan.tif", window=Window(0, 0, 64, 64))


def test_truncated_data_fails_on_read(fresh: Pipeline) -> None:
    with pytest.raises(RasterError) as exc:
        fresh.caption(DATA / "truncated_data.tif")
    _one_line(exc.value, "truncated_data.tif")


# ------------------------------------------------------------------------------------------- cache
def test_feature_cache_lru_bounds() -> None:
    import torch

    cache = FeatureCache(max_entries=3, max_bytes=10_000)
    for i in range(4):
        cache.put(i, torch.zeros(1, 10, 10))  # 400 bytes each
    assert len(cache) == 3 and 0 not in cache and 3 in cache
    assert cache.get(1) is not None  # 1 becomes most recent
    cache.put(4, torch.zeros(1, 10, 10))
    assert 2 not in cache and 1 in cache
    cache.put("big", np.zeros((1, 100, 30), dtype=np.float32))  # 12 KB > max_bytes: not kept
    assert "big" not in cache
    small = FeatureCache(max_entries=100, max_bytes=1000)
    for i in range(5):
        small.put(i, np.zeros(100, dtype=np.float32))  # 400 bytes
    assert len(small) == 2 and small.nbytes == 800
    assert small.stats()["max_bytes"] == 1000


# ------------------------------------------------------------------------------------------- other backends
def test_onnx_backend_through_the_pipeline(pipeline: Pipeline, tmp_path: Path) -> None:
    """The pipeline runs any MoEInference backend: ONNX Runtime gives the torch pipeline's captions."""
    pytest.importorskip("onnxruntime")
    import shutil

    from export.exporter import ExportOptions, export_model

    model_dir = tmp_path / "trained"
    shutil.copytree(pipeline.info.model_dir, model_dir)
    for part in ("vision", "bert", "llama"):  # the config's relative references to the tiny base checkpoints
        (tmp_path / part).symlink_to(Path(pipeline.info.model_dir).parent / part)
    export_model(model_dir, options=ExportOptions(variants=["fp32"], parity=False))
    onnx = Pipeline.load(model_dir, backend="onnx", device="cpu", batch_size=2)
    info = onnx.info.to_dict()
    assert info["backend"] == "onnx" and info["providers"] == ["CPUExecutionProvider"] and info["gpu"] is False
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    expected = Pipeline(pipeline.model, pipeline.info).caption(S2, window=Window(0, 0, 256, 256))
    got = onnx.caption(S2, window=Window(0, 0, 256, 256))
    assert got.text == expected.text
    assert onnx.ask(S2, "how many fields?", window=Window(0, 0, 256, 256)).cached
    result = onnx.annotate(S2, 256, tmp_path / "onnx.geojson")
    assert result.captioned == 4
