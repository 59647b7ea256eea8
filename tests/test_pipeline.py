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

from engine.bands import BandSelection
from engine.errors import InputNotFoundError, RasterError, UserInputError
from engine.georef import Window
from engine.inputs import ImageInput, check_input
from engine.pipeline import FeatureCache, ModelInfo, Pipeline
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
    assert spy.calls == 2 * 8  # two batches, each: the image, then one pass per other view (7)
    expected_visual, expected_logits = model.encode(images)  # one batch of 3 against batches of 2 + 1: float noise
    assert torch.allclose(visual, expected_visual, atol=1e-5) and torch.allclose(logits, expected_logits, atol=1e-5)
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
    calls = fresh.stats.language_calls
    with pytest.raises(InputNotFoundError, match=r"^image 2 of 2: .*missing\.tif"):  # read before any model work
        fresh.caption_batch([S2, DATA / "missing.tif"])
    with pytest.raises(RasterError, match=r"^items\[1\]: window"):
        fresh.caption_batch([S2, ImageInput(path=str(S2), window=Window(500, 500, 64, 64))],
                            names=["items[0]", "items[1]"])
    with pytest.raises(InputNotFoundError, match="missing.tif") as one:  # one input: its own message
        fresh.caption_batch([DATA / "missing.tif"])
    assert not str(one.value).startswith("image")
    assert fresh.stats.language_calls == calls


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

    from engine.jobs import annotate
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
    result = annotate(onnx, S2, 256, tmp_path / "onnx.geojson")
    assert result.captioned == 4


# ------------------------------------------------------------------------------------------- ground resolution
RESOLUTION_PROMPT = "Ground resolution {resolution} per pixel."


@pytest.fixture(scope="module")
def conditioned(tiny_dir: Path) -> Pipeline:  # noqa: F811
    """The tiny model conditioned on the ground resolution, trained on 0.3-12 m/px (a new config: its own
    fingerprint, so its own cache entries)."""
    from engine.model import RSMoEModel
    from engine.model.config import ResolutionConfig

    model = RSMoEModel.from_pretrained(tiny_dir)
    model.config.resolution = ResolutionConfig(prompt=RESOLUTION_PROMPT, min_m=0.3, max_m=12.0, tile_m=20.0)
    return Pipeline(model, ModelInfo.of(model, "torch", tiny_dir), batch_size=2)


def test_seen_resolution_of_a_window_of_a_real_raster() -> None:
    from engine.inputs import seen_resolution
    from engine.raster import RasterSource

    with RasterSource(S2) as source:  # Sentinel-2, 10 m
        window = Window(0, 0, 256, 256)
        native = source.ground_resolution_of(window)
        assert 9.99 < native < 10.02
        assert seen_resolution(native, 256, 256, 224) == pytest.approx(native * 256 / 224)
        assert round(seen_resolution(native, 256, 256, 224), 1) == 11.4  # a 256 px window read to 224 px
        assert seen_resolution(native, 256, 128, 224) == seen_resolution(native, 128, 256, 224)  # the longer side
        assert seen_resolution(native, 112, 112, 224) == pytest.approx(native / 2)  # upsampled: finer
    with RasterSource(DATA / "usgs_3857.tif") as source:  # EPSG:3857, 0.2022 map-m = 0.1524 m on the ground
        native = source.ground_resolution_of(Window(0, 0, 512, 512))
        assert seen_resolution(native, 512, 512, 224) == pytest.approx(0.1524 * 512 / 224, rel=0.01)
    assert seen_resolution(None, 256, 256, 224) is None


def test_results_report_native_and_seen_resolution(fresh: Pipeline) -> None:
    size = fresh.image_size
    res = fresh.caption(S2, window=Window(0, 0, 256, 128))
    d = res.to_dict()
    assert 9.99 < d["ground_resolution_m"] < 10.02
    assert d["model_resolution_m"] == float(f"{d['ground_resolution_m'] * 256 / size:.3g}")  # 3 significant figures
    assert res.result.plan.resolution_m == pytest.approx(d["ground_resolution_m"] * 256 / size)
    assert d["uncertain"] is False and d["uncertainty"] == []  # the tiny model has no trained range
    png = (DATA / "s2_plain.png").read_bytes()
    plain = fresh.caption(png).to_dict()
    assert plain["ground_resolution_m"] is None and plain["model_resolution_m"] is None  # unknown
    told = fresh.ask(png, "what is this?", ground_resolution_m=0.5).to_dict()  # 256 px at 0.5 m
    assert told["ground_resolution_m"] == 0.5 and told["model_resolution_m"] == float(f"{0.5 * 256 / size:.3g}")
    with pytest.raises(UserInputError, match="ground resolution"):
        ImageInput(data=png, ground_resolution_m=-1.0)


def test_resolution_reaches_the_prompts_also_from_the_cache(conditioned: Pipeline) -> None:
    config = conditioned.model.config
    size = conditioned.image_size
    res = conditioned.caption(S2, window=Window(0, 0, 256, 256), style="detailed")
    seen = res.result.plan.resolution_m
    phrase = config.resolution.phrase(seen)
    assert phrase.startswith("Ground resolution about ") and seen == pytest.approx(10.0 * 256 / size, rel=0.01)
    assert res.result.segments and all(s.prompt.startswith(phrase) for s in res.result.segments)
    answer = conditioned.ask(S2, "how many fields are there?", window=Window(0, 0, 256, 256))
    assert answer.cached and answer.result.segments[0].prompt.startswith(phrase)
    png = (DATA / "s2_plain.png").read_bytes()
    unknown = conditioned.caption(png)
    assert not any(s.prompt.startswith("Ground resolution") for s in unknown.result.segments)
    told = conditioned.caption(png, ground_resolution_m=0.05)  # the same pixels, from the cache, another resolution
    assert told.cached and told.result.plan.resolution_m == pytest.approx(0.05 * 256 / size)
    fine = config.resolution.phrase(0.05 * 256 / size)
    assert fine != phrase and all(s.prompt.startswith(fine) for s in told.result.segments)


def test_uncertain_when_the_resolution_is_outside_the_trained_range(conditioned: Pipeline) -> None:
    size = conditioned.image_size
    png = (DATA / "s2_plain.png").read_bytes()  # 256 px
    inside = conditioned.caption(png, ground_resolution_m=4 * size / 256).to_dict()  # seen 4 m/px
    assert inside["model_resolution_m"] == 4.0 and inside["uncertain"] is False and inside["uncertainty"] == []
    fine = conditioned.caption(png, ground_resolution_m=0.05 * size / 256).to_dict()  # seen 0.05 m/px
    assert fine["uncertain"] is True
    assert fine["uncertainty"] == ["resolution 0.05 m/px is finer than the trained range 0.3-12 m/px"]
    coarse = conditioned.ask(S2, "is there water?", window=Window(0, 0, 256, 256)).to_dict()  # ~80 m/px seen
    assert coarse["uncertain"] is True and "coarser than the trained range 0.3-12 m/px" in coarse["uncertainty"][0]
    edge = conditioned.caption(png, ground_resolution_m=0.25 * size / 256).to_dict()  # within 1.5x of 0.3
    assert edge["uncertain"] is False


COVER_TILES = ["This is a rural area of farmland with a river and a forest.", "This is an urban area of houses.",
               "This is a rural area of farmland with a forest.", "This is a rural area of grassland with houses."]


def test_a_coarse_region_is_captioned_from_tiles_the_model_knows(conditioned: Pipeline,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = Pipeline(conditioned.model, conditioned.info, batch_size=4)
    calls: list[list] = []
    original = fresh.caption_images

    def captions(images, style="concise", keys=None, resolutions=None, texts=COVER_TILES):
        calls.append(list(resolutions))
        results = original(images, style, keys, resolutions)
        for k, r in enumerate(results):
            r.text = texts[k % len(texts)]
        return results

    monkeypatch.setattr(fresh, "caption_images", captions)
    size = fresh.image_size
    res = fresh.caption(S2)  # 512 px at 10 m as one image: far coarser than 12 m/px
    assert len(calls) == 1 and len(calls[0]) == 16  # 4 x 4 tiles (the most a side), nothing of the whole image
    assert calls[0] == pytest.approx([10.0 * 128 / size] * 16, rel=0.01)
    assert res.text == "This is a rural area of farmland with a forest, houses, a river and grassland."
    d = res.to_dict()
    assert d["model_resolution_m"] == pytest.approx(10.0 * 128 / size, rel=0.01)
    assert d["uncertain"] and d["uncertainty"] == [  # the tiles are still coarser than 12 m/px (tiny model)
        f"16 of 16 tiles unsure: resolution {d['model_resolution_m']:g} m/px is coarser than the trained range "
        "0.3-12 m/px"]
    assert [s["expert"] for s in d["segments"]] == ["theme"] and d["segments"][0]["text"] == res.text
    assert d["segments"][0]["prompt"].startswith("[4 x 4 tiles] ")
    visual, logits = fresh.encode([fresh.read_region(ImageInput.of(S2)).image])  # the whole image's plan is kept
    plans, router = fresh.model.caption_plans(visual, "concise", logits, [10.0 * 512 / size])
    confidence = plans[0].scene_confidence
    assert (d["scene"], d["scene_confidence"], d["router"]) == (
        plans[0].scene, None if confidence is None else round(confidence, 4), router)
    detailed = fresh.caption(S2, style="detailed").to_dict()  # the theme from the tiles, the rest from the image
    assert len(calls) == 3 and detailed["text"].startswith(res.text + " ")  # the whole image, then the tiles
    assert [s["expert"] for s in detailed["segments"]] == fresh.model.config.expert_names
    assert detailed["segments"][0]["text"] == res.text and detailed["model_resolution_m"] > d["model_resolution_m"]
    assert detailed["uncertainty"][0] == d["uncertainty"][0] and len(detailed["uncertainty"]) == 2

    calls.clear()  # tiles whose captions are not land-cover sentences: the whole image's caption stands
    monkeypatch.setattr(fresh, "caption_images", lambda *a, **k: captions(*a, **k, texts=["Many green trees."]))
    assert fresh.caption(S2).text == "Many green trees." and len(calls) == 2  # the tiles, then the whole image
    inside = fresh.caption(S2, window=Window(0, 0, size, size))  # seen at 10 m: one image, no tiles
    assert len(calls) == 3 and inside.text == "Many green trees." and not inside.uncertain


def test_cover_sentences_parse_and_compose() -> None:
    from engine.model.covers import CoverSentence, compose_cover_sentences, covers_mentioned, parse_cover_sentence

    assert parse_cover_sentence("This is a rural area of farmland with a river, a lake and a forest.") == \
        CoverSentence("rural", "farmland", ("river", "water", "forest"))
    assert parse_cover_sentence("this is an urban area of industrial buildings") == \
        CoverSentence("urban", "industrial buildings", ())
    for other in ("This is a river with farmland.", "Many buildings are in a dense residential area .",
                  "This is a rural area of farmland with , and ."):
        assert parse_cover_sentence(other) is None
    tiles = [parse_cover_sentence(t) for t in COVER_TILES]
    assert compose_cover_sentences(tiles[1:2]) == "This is an urban area of houses."
    assert compose_cover_sentences(tiles[2:]) == "This is a rural area of farmland with a forest, grassland and houses."
    water = [parse_cover_sentence("This is an urban area of water with houses."),
             parse_cover_sentence("This is a rural area of farmland with a lake.")]
    assert compose_cover_sentences(water) == "This is an urban area of water with houses and farmland."
    # another kind of caption adds the covers it mentions ("trees" are no forest), in the tiles' order
    beach = "This is a part of a beach with blue water , white sand and some trees ."
    assert covers_mentioned(beach) == ["beach"] and covers_mentioned("A piece of farmland with a lake.") == [
        "farmland", "water"]
    assert compose_cover_sentences([tiles[2], covers_mentioned(beach), tiles[3]]) == (
        "This is a rural area of farmland with a forest, a beach, grassland and houses.")
    with pytest.raises(ValueError):
        compose_cover_sentences([["beach"]])


def test_uncertainty_reasons() -> None:
    from engine.model.config import ResolutionConfig, RSMoEConfig
    from engine.model.router_plan import RouterPlan
    from engine.model.routing import ModelResult, uncertainty_reasons

    config = RSMoEConfig.variant("lite")
    config.vision.scene_min_confidence = 0.8
    config.resolution = ResolutionConfig(min_m=0.3, max_m=12.0)
    assert uncertainty_reasons(config, RouterPlan(scene=None, scene_confidence=0.41)) == ["scene unsure (0.41)"]
    assert uncertainty_reasons(config, RouterPlan(scene="beach", scene_confidence=0.8)) == []
    assert uncertainty_reasons(config, RouterPlan()) == []  # no scene head, resolution unknown
    both = uncertainty_reasons(config, RouterPlan(scene="beach", scene_confidence=0.5, resolution_m=0.0512))
    assert both == ["scene unsure (0.50)", "resolution 0.0512 m/px is finer than the trained range 0.3-12 m/px"]
    config.vision.scene_min_confidence = 0.0  # no gate: the head is never "unsure"
    config.resolution = ResolutionConfig()  # an old model: no range
    assert uncertainty_reasons(config, RouterPlan(scene_confidence=0.1, resolution_m=1000.0)) == []
    result = ModelResult("a beach.", "caption", "concise", RouterPlan(scene_confidence=0.3), "generative")
    d = result.to_dict()
    assert d["uncertain"] is False and d["uncertainty"] == [] and d["scene_confidence"] == 0.3  # not assessed yet
    config.vision.scene_min_confidence = 0.5
    d = result.assess(config).to_dict()
    assert d["uncertain"] is True and d["uncertainty"] == ["scene unsure (0.30)"] and d["scene"] is None


def test_scene_unsure_makes_the_result_uncertain(tiny_dir: Path) -> None:  # noqa: F811
    import torch

    from engine.model import RSMoEModel

    model = RSMoEModel.from_pretrained(tiny_dir)
    torch.manual_seed(1)
    model.set_scene_head(["beach", "forest", "harbor"], torch.nn.Linear(model.vision.num_features, 3))
    model.config.vision.scene_min_confidence = 0.99  # three random classes: the head is never that sure
    pipe = Pipeline(model, ModelInfo.of(model, "torch", tiny_dir), batch_size=2)
    for res in (pipe.caption(S2, window=Window(0, 0, 128, 128), style="concise"),
                pipe.ask(S2, "is this a beach?", window=Window(0, 0, 128, 128))):
        d = res.to_dict()
        assert d["scene_confidence"] < 0.99 and d["uncertain"] is True
        assert d["uncertainty"] == [f"scene unsure ({d['scene_confidence']:.2f})"]
    model.config.vision.scene_min_confidence = 0.0
    assert pipe.caption(S2, window=Window(0, 0, 128, 128)).to_dict()["uncertain"] is False


def test_a_scene_learnt_only_at_far_other_resolutions_is_not_named(tiny_dir: Path) -> None:  # noqa: F811
    import torch

    from engine.model import RSMoEModel
    from engine.model.config import SCENE_RESOLUTION_SLACK

    model = RSMoEModel.from_pretrained(tiny_dir)
    model.config.vision.scene_classes = ["golf course", "sea or lake", "beach"]
    model.config.resolution.scene_m = {"golf course": [0.33, 0.35], "sea or lake": [2.857, 11.429],
                                       "beach": [None, None]}
    logits = np.log(np.array([[0.85, 0.10, 0.05]] * 4))
    guesses = model.scene_guesses(None, logits, [11.4, 0.5, None, 0.35 * SCENE_RESOLUTION_SLACK])
    assert [g.scene for g in guesses] == ["sea or lake", "golf course", "golf course", "golf course"]
    assert guesses[0].confidence == pytest.approx(0.10 / 0.15) and guesses[1].confidence == pytest.approx(0.85 / 0.90)
    assert guesses[2].confidence == pytest.approx(0.85)  # unknown resolution: every class stays
    assert [g.scene for g in model.scene_guesses(None, logits)] == ["golf course"] * 4  # none given: no change
    model.config.resolution.scene_m = {"golf course": [0.33, 0.35], "sea or lake": [0.33, 0.35], "beach": [0.3, 0.3]}
    assert model.scene_guesses(None, logits[:1], [11.4])[0].scene == "golf course"  # none plausible: all stay

    # through the pipeline: the plan of a Sentinel-2 tile never names the class learnt on 0.3 m aerials
    head = torch.nn.Linear(model.vision.num_features, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([4.0, 0.0]))
    model.set_scene_head(["golf course", "sea or lake"], head)
    model.config.resolution.scene_m = {"golf course": [0.33, 0.35], "sea or lake": [None, None]}
    model.config.vision.scene_min_confidence = 0.0
    pipe = Pipeline(model, ModelInfo.of(model, "torch", tiny_dir), batch_size=2)
    tile = Window(0, 0, 128, 128)
    for res in (pipe.caption(S2, window=tile), pipe.ask(S2, "what is this?", window=tile)):
        assert res.result.plan.scene == "sea or lake" and res.result.plan.scene_confidence == pytest.approx(1.0)
    model.config.resolution.scene_m = {}
    assert pipe.caption(S2, window=tile).result.plan.scene == "golf course"


def test_resolution_survives_a_plan_written_by_the_router(conditioned: Pipeline,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A trained router writes a plan the engine parses: the image's resolution must stay in that plan too
    (the shipped model's router always writes one)."""
    model = conditioned.model
    original = model.generate_texts

    def router_writes_a_plan(visual, prompts, adapters, max_new_tokens, num_beams=1):
        if all(a == "router" for a in adapters):
            return ["scene: beach | experts: objects"] * len(prompts)
        return original(visual, prompts, adapters, max_new_tokens, num_beams)

    monkeypatch.setattr(model, "generate_texts", router_writes_a_plan)
    answer = conditioned.ask(S2, "how many boats are there?", window=Window(0, 0, 256, 256))
    assert answer.result.plan.experts == ["objects"] and answer.result.plan.scene == "beach"  # the router's plan
    seen = answer.result.plan.resolution_m
    assert seen == pytest.approx(10.0 * 256 / conditioned.image_size, rel=0.01)
    assert answer.result.segments[0].prompt.startswith(model.config.resolution.phrase(seen))
    assert answer.to_dict()["model_resolution_m"] is not None and answer.to_dict()["uncertain"] is True
