"""Caption and ask over a loaded model (any :class:`~engine.model.routing.MoEInference` backend).

Inputs
    An :class:`engine.inputs.ImageInput`: a raster path or image bytes, optionally a window or an
    extent of it, and a band choice. Batch annotation of a whole raster is :mod:`engine.jobs`'s, which
    feeds its tiles through :meth:`Pipeline.caption_images`.

Caption / ask
    A region is read once, downsampled (:meth:`RasterSource.read_overview`, longer side at most the
    model input size), encoded by the vision encoder and then captioned or questioned. A region seen
    coarser than the model's trained range (a whole Sentinel-2 scene in one image) is captioned (concise)
    and asked closed questions on a grid of tiles the model knows, and the tiles' results are combined:
    the tiles' land-cover sentences make the region's (:mod:`engine.model.covers`), their answers its answer.

Ground resolution
    Every image goes to the model with the ground resolution it shows
    (:func:`engine.inputs.seen_resolution`: metres per pixel of the model input, i.e. the window's native
    ground resolution times its longer side over the model input size): models conditioned on it (``resolution.prompt``) get it in their prompts, and every
    result reports it (``model_resolution_m``, beside the native ``ground_resolution_m``) and says when it
    lies outside the trained range (``uncertain``, ``uncertainty``). Images without georeferencing have an
    unknown resolution unless the request gives their native one (``ImageInput.ground_resolution_m``).

Feature cache (:class:`FeatureCache`)
    The vision encoder's output for every image read (its tokens, and the scene head's logits over the
    image's dihedral views) is kept in an LRU bounded in entries and
    bytes, keyed by raster identity (path + size + mtime, or a hash of the bytes) + window + read
    size + resolved bands + model. A follow-up question about the same region, or about a tile a
    batch job has just captioned, skips the vision encoder. The ground resolution is not part of the
    key: it only shapes the prompts, which are built at every call.

Batching and threads
    Images go through the model ``batch_size`` at a time. Every model call holds
    :attr:`Pipeline.lock`, so one model may be shared by several threads (the service's request
    threads and its job worker): calls are serialised, raster reads are not.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Hashable, Iterator, Sequence

import numpy as np

from engine import __version__
from engine.errors import RasterError, RSMoEError, UserInputError
from engine.georef import Window
from engine.inputs import ImageInput, open_input, resolve_window, seen_resolution
from engine.model.answer_head import HeadAnswer, built_up_share, combine_tile_answers, region_grid
from engine.model.covers import compose_cover_sentences, covers_mentioned, parse_cover_sentence
from engine.model.routing import (CAPTION_STYLES, MAX_QUESTION_CHARS, ExpertOutput, ModelResult, MoEInference,
                                  concat_rows, fuse, softmax_rows)
from engine.raster import TileRead
from engine.runtime import ModelSpec

log = logging.getLogger(__name__)

#: bench/results/annotate_cpu.json (2 cores, ONNX fp32): the most tiles/s whose peak RSS stays under 2 GB
DEFAULT_BATCH_SIZE = 64
#: A closed question about a region seen coarser than the trained range is answered on tiles seen at this share
#: of the coarsest trained resolution (at most MAX_ANSWER_GRID tiles a side). On the README's Sentinel-2 example
#: (22.9 m/px as one image) 2 x 2 tiles at the coarsest resolution split rural / urban 2:2; 4 x 4 at half of it
#: (5.7 m/px, about EuroSAT's 2.9 m/px) answer 10:6 rural, as the scene is.
ANSWER_TILE_SEEN_FRACTION = 0.5
MAX_ANSWER_GRID = 6
#: The theme sentence of a region seen coarser than the trained range is written from at most this many tiles a
#: side, each seen at about the coarsest trained resolution (:meth:`Pipeline._caption_over_tiles`).
MAX_CAPTION_GRID = 4
#: Region tiles (rural / urban, an answer head's region inputs) are at least this many raster pixels a side:
#: EuroSAT's and RSVQA-LR's are 64; a few dozen pixels magnified to the model's input show nothing.
MIN_REGION_TILE_PX = 48
#: Default bounds of the feature cache (the lite model's 49 x 1280 float32 tokens are 250 KB per image).
CACHE_MAX_ENTRIES = 512
CACHE_MAX_BYTES = 128 * 2**20


# --------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------
def check_question(question: str) -> None:
    """The model's question rules (non-empty, at most ``MAX_QUESTION_CHARS``), checked before any work."""
    if not isinstance(question, str) or not question.strip():
        raise UserInputError("the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise UserInputError(f"the question has {len(question)} characters; the limit is {MAX_QUESTION_CHARS}")


# --------------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------------
def _nbytes(value: Any) -> int:
    if isinstance(value, tuple):
        return sum(_nbytes(part) for part in value if part is not None)
    if hasattr(value, "nbytes") and not callable(value.nbytes):
        return int(value.nbytes)
    return int(value.element_size() * value.nelement())  # torch.Tensor


class FeatureCache:
    """A thread-safe LRU of visual features (tokens, scene logits), bounded in entries and bytes."""

    def __init__(self, max_entries: int = CACHE_MAX_ENTRIES, max_bytes: int = CACHE_MAX_BYTES) -> None:
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = _nbytes(value)
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            if self.max_entries <= 0 or size > self.max_bytes:
                return
            self._items[key] = (value, size)
            self._bytes += size
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is cached (does not count as a hit or refresh the entry)."""
        with self._lock:
            return key in self._items

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._items), "bytes": self._bytes, "max_entries": self.max_entries,
                "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses}


# --------------------------------------------------------------------------------------------
# Model facts
# --------------------------------------------------------------------------------------------
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@dataclass
class ModelInfo:
    """What runs: model id, variant, trained or not, backend, device, providers, engine version."""

    model_id: str
    variant: str
    trained: bool
    backend: str
    device: str
    providers: list[str]
    gpu: bool
    dtype: str
    model_dir: str | None
    fingerprint: str
    version: str = __version__
    gpu_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, model: MoEInference, backend: str | None = None, model_dir: str | Path | None = None) -> ModelInfo:
        """Facts about a loaded model (torch or ONNX Runtime backend)."""
        providers = [str(p) for p in getattr(model, "providers", None) or []]
        backend = backend or ("onnx" if providers else "torch")
        device_obj = getattr(model, "device", "cpu")
        dev_type = getattr(device_obj, "type", str(device_obj))
        dev_index = getattr(device_obj, "index", getattr(device_obj, "id", None))
        device = f"{dev_type}:{dev_index or 0}" if dev_type == "cuda" else str(dev_type)
        if not providers:
            providers = [device]
        gpu = dev_type == "cuda" or any(p in _GPU_PROVIDERS for p in providers[:1])
        gpu_name = None
        if gpu:
            try:
                import torch

                gpu_name = torch.cuda.get_device_name(int(dev_index or 0)) if torch.cuda.is_available() else None
            except Exception:  # pragma: no cover - depends on the machine
                gpu_name = None
        raw = getattr(model, "dtype", None) or getattr(model, "float_type", np.float32)
        dtype = str(raw).replace("torch.", "") if hasattr(raw, "is_floating_point") else np.dtype(raw).name
        where = model_dir or getattr(model, "model_dir", None)
        directory = Path(where) if where else None
        trained = bool(model.trained_adapters) or bool(directory and (directory / "model.safetensors").exists())
        config = model.config
        return cls(model_id=config.model_id, variant=config.variant, trained=trained, backend=backend,
                   device=device, providers=providers, gpu=gpu, dtype=dtype,
                   model_dir=str(directory) if directory else None,
                   fingerprint=_fingerprint(config, directory, backend, dtype), gpu_name=gpu_name)


def _fingerprint(config: Any, directory: Path | None, backend: str, dtype: str) -> str:
    """A short hash that changes when the model's config or weight files change."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    h.update(f"{backend}:{dtype}".encode())
    if directory is not None and directory.is_dir():
        for p in sorted(directory.rglob("*.safetensors")) + sorted(directory.rglob("*.onnx")):
            st = p.stat()
            h.update(f"{p.relative_to(directory)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass
class RegionRead:
    """A region read for the model: the pixels, the cache key, facts about the source, and the region's
    native ground resolution (metres per raster pixel at its centre, or given by the request)."""

    read: TileRead
    key: tuple[Hashable, ...]
    source: dict[str, Any]
    ground_resolution_m: float | None

    @property
    def image(self) -> np.ndarray:
        assert self.read.image is not None
        return self.read.image

    def seen_resolution(self, image_size: int) -> float | None:
        """Metres per pixel of the model input (see :func:`seen_resolution`)."""
        window = self.read.window
        return seen_resolution(self.ground_resolution_m, window.width, window.height, image_size)


@dataclass
class RegionResult:
    """A caption or an answer about one region, with where it came from.

    ``ground_resolution_m``: the region's native ground resolution (metres per raster pixel); the
    resolution the model saw is the result's ``model_resolution_m``."""

    result: ModelResult
    window: Window
    source: dict[str, Any]
    cached: bool
    seconds: float
    ground_resolution_m: float | None = None

    @property
    def text(self) -> str:
        return self.result.text

    @property
    def model_resolution_m(self) -> float | None:
        return self.result.model_resolution_m

    @property
    def uncertain(self) -> bool:
        return self.result.uncertain

    def to_dict(self) -> dict[str, Any]:
        return {**self.result.to_dict(), "ground_resolution_m": self.ground_resolution_m,
                "window": self.window.to_list(), "source": self.source,
                "cached": self.cached, "seconds": round(self.seconds, 3)}


@dataclass
class PipelineStats:
    """Counters for tests and benchmarks."""

    encoder_calls: int = 0
    encoded_images: int = 0
    language_calls: int = 0


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------
def _row(visual: Any, i: int) -> Any:
    part = visual[i:i + 1]
    return part.clone() if hasattr(part, "clone") else np.array(part, copy=True)


class Pipeline:
    """Caption / ask over one loaded model, with batching and a visual feature cache (batch annotation of a
    raster with it: :func:`engine.jobs.annotate`).

    Parameters
    ----------
    model
        A loaded model (torch ``RSMoEModel`` or the ONNX Runtime backend).
    info
        Facts about the model (default: :meth:`ModelInfo.of`).
    batch_size
        Images per model call.
    cache
        The feature cache (default: a fresh :class:`FeatureCache`).
    """

    def __init__(self, model: MoEInference, info: ModelInfo | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 cache: FeatureCache | None = None) -> None:
        if int(batch_size) < 1:
            raise UserInputError(f"batch size must be >= 1, got {batch_size}")
        self.model = model
        self.info = info or ModelInfo.of(model)
        self.batch_size = int(batch_size)
        self.cache = cache if cache is not None else FeatureCache()
        self.lock = threading.RLock()
        self.stats = PipelineStats()
        #: how the model was loaded (set by :meth:`load`): what Ray workers load for a job of the service
        self.spec: ModelSpec | None = None

    @classmethod
    def load(cls, model_dir: str | Path | None = None, backend: str = "auto", device: str = "auto",
             dtype: str | None = None, threads: int | None = None, **options: Any) -> Pipeline:
        """Load a model through :func:`engine.runtime.load_model` (``auto``: the backend it picks; ``threads``
        for ONNX Runtime) and wrap it."""
        from engine.runtime import default_model_dir, load_model

        model = load_model(model_dir, backend, device, dtype, threads)
        info = ModelInfo.of(model, model.describe()["backend"], model_dir or default_model_dir())
        log.info("model %s (%s, %s) on %s via %s", info.model_id, info.variant,
                 "trained" if info.trained else "UNTRAINED", info.device, info.backend)
        pipeline = cls(model, info, **options)
        pipeline.spec = ModelSpec(str(model_dir) if model_dir else None, backend, device, dtype)
        return pipeline

    @property
    def image_size(self) -> int:
        """The model's square input size in pixels."""
        return int(self.model.image_processor.config.image_size)

    # -- model calls -------------------------------------------------------------------------
    def encode(self, images: Sequence[np.ndarray],
               keys: Sequence[Hashable | None] | None = None) -> tuple[Any, Any | None]:
        """Visual tokens (B, N, D) and scene logits (B, scenes; ``None`` without a scene head) for images,
        from the cache where ``keys`` hit it."""
        keys = list(keys) if keys is not None else [None] * len(images)
        if len(keys) != len(images):
            raise ValueError("one cache key per image (or None)")
        found: list[Any] = [self.cache.get(self._key(k)) if k is not None else None for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            with self.lock:
                visual, scene_logits = self.model.encode([images[i] for i in chunk])
                self.stats.encoder_calls += 1
                self.stats.encoded_images += len(chunk)
            for j, i in enumerate(chunk):
                found[i] = (_row(visual, j), None if scene_logits is None else _row(scene_logits, j))
                if keys[i] is not None:
                    self.cache.put(self._key(keys[i]), found[i])
        visual = concat_rows([f[0] for f in found])
        return visual, None if found[0][1] is None else concat_rows([f[1] for f in found])

    def _key(self, key: Hashable) -> Hashable:
        return (self.info.fingerprint, key)

    def caption_images(self, images: Sequence[np.ndarray], style: str = "concise",
                       keys: Sequence[Hashable | None] | None = None,
                       resolutions: Sequence[float | None] | None = None) -> list[ModelResult]:
        """Caption HxWx3 uint8 images, ``batch_size`` at a time; ``resolutions``: each image's ground resolution
        as the model sees it (metres per pixel of the model input, None where unknown)."""
        _check_style(style)
        return self._run(images, keys, resolutions, lambda visual, logits, rows, res: self.model.caption_features(
            visual, style, logits, resolutions=res))

    def ask_images(self, images: Sequence[np.ndarray], questions: Sequence[str],
                   keys: Sequence[Hashable | None] | None = None,
                   resolutions: Sequence[float | None] | None = None,
                   region_probabilities: np.ndarray | None = None) -> list[ModelResult]:
        """Answer one question per image, ``batch_size`` at a time (``resolutions`` as for :meth:`caption_images`;
        ``region_probabilities`` as for :meth:`MoEInference.head_answers`)."""
        if len(questions) != len(images):
            raise ValueError("one question per image")
        return self._run(images, keys, resolutions, lambda visual, logits, rows, res: self.model.ask_features(
            visual, [questions[i] for i in rows], logits, resolutions=res,
            region_probabilities=None if region_probabilities is None else region_probabilities[rows]))

    def _run(self, images: Sequence[np.ndarray], keys: Sequence[Hashable | None] | None,
             resolutions: Sequence[float | None] | None, call: Any) -> list[ModelResult]:
        keys = list(keys) if keys is not None else [None] * len(images)
        resolutions = list(resolutions) if resolutions is not None else [None] * len(images)
        if len(keys) != len(images) or len(resolutions) != len(images):
            raise ValueError("one cache key and one resolution per image (or None)")
        results: list[ModelResult] = []
        for start in range(0, len(images), self.batch_size):
            rows = list(range(start, min(start + self.batch_size, len(images))))
            visual, scene_logits = self.encode([images[i] for i in rows], [keys[i] for i in rows])
            with self.lock:
                batch = call(visual, scene_logits, rows, [resolutions[i] for i in rows])
                self.stats.language_calls += 1
            results.extend(batch)
        return results

    # -- regions -----------------------------------------------------------------------------
    def read_region(self, inp: ImageInput) -> RegionRead:
        """Read an input's region downsampled to the model input, with its cache key, source facts and
        native ground resolution (the request's, else the raster's at the region centre)."""
        with open_input(inp) as (source, identity):
            window = resolve_window(source, inp)
            read = source.read_overview(window, max_size=self.image_size)
            facts = source.describe()
            if inp.data is not None:
                facts["path"] = None
            native = inp.ground_resolution_m
            if native is None:
                native = source.ground_resolution_of(window)
            key = (identity, tuple(window.to_list()), tuple(source.band_indices),
                   None if read.image is None else read.image.shape[:2])
        if read.image is None:
            raise RasterError(f"window {window.to_list()} of {inp.label} holds no valid pixels (all nodata)")
        return RegionRead(read, key, facts, native)

    def _log_outside(self, region: RegionRead, label: str) -> None:
        seen = region.seen_resolution(self.image_size)
        side = self.model.config.resolution.outside(seen)
        if side is not None:
            log.info("%s is seen at %.3g m/px, %s than the model's trained range: the result says it is uncertain",
                     label, seen, side)

    def caption(self, item: ImageInput | str | Path | bytes, style: str = "concise", **region: Any) -> RegionResult:
        """Caption a raster, an image, or a window / extent of it (a downsampled read)."""
        return self.caption_batch([ImageInput.of(item, **region)], style)[0]

    def read_regions(self, inputs: Sequence[ImageInput], names: Sequence[str] | None = None) -> list[RegionRead]:
        """:meth:`read_region` of every input, all read before any model work; an error names its input
        (``names[i]``, default ``image 2 of 3`` when there are several)."""
        regions = []
        for i, inp in enumerate(inputs):
            try:
                regions.append(self.read_region(inp))
            except RSMoEError as exc:
                name = names[i] if names is not None else f"image {i + 1} of {len(inputs)}" if len(inputs) > 1 else ""
                if not name:
                    raise
                raise type(exc)(f"{name}: {exc}") from None
        return regions

    def caption_batch(self, items: Sequence[ImageInput | str | Path | bytes], style: str = "concise",
                      names: Sequence[str] | None = None) -> list[RegionResult]:
        """Caption several inputs (one downsampled read each), batched through the model; ``names``: how
        errors name each input (see :meth:`read_regions`)."""
        _check_style(style)
        start = time.perf_counter()
        inputs = [ImageInput.of(item) for item in items]
        regions = self.read_regions(inputs, names)
        grids = [self._caption_grid(region) for region in regions]
        for inp, region, grid in zip(inputs, regions, grids):
            if grid == 1:
                self._log_outside(region, inp.label)
        hits = [self._key(r.key) in self.cache for r in regions]
        # a concise caption made from tiles needs nothing decoded of the whole image (only its plan)
        as_one_image = [i for i, grid in enumerate(grids) if grid == 1 or style != "concise"]
        results: list[ModelResult | None] = [None] * len(regions)
        if as_one_image:
            decoded = self.caption_images([regions[i].image for i in as_one_image], style,
                                          [regions[i].key for i in as_one_image],
                                          [regions[i].seen_resolution(self.image_size) for i in as_one_image])
            for i, result in zip(as_one_image, decoded):
                results[i] = result
        for i, (inp, region, grid) in enumerate(zip(inputs, regions, grids)):
            if grid > 1:
                results[i] = self._caption_over_tiles(inp, region, grid, style, results[i])
        seconds = (time.perf_counter() - start) / max(1, len(inputs))
        return [RegionResult(res, r.read.window, r.source, hit, seconds, r.ground_resolution_m)
                for res, r, hit in zip(results, regions, hits)]

    def _coarse_grid(self, part: RegionRead, fraction: float, max_grid: int) -> int:
        """Tiles per side (2 to ``max_grid``) that are each seen at about ``fraction`` of the coarsest trained
        resolution, for ``part`` seen coarser than the trained range; 1 otherwise (or where unknown)."""
        seen = part.seen_resolution(self.image_size)
        resolution = self.model.config.resolution
        if seen is None or resolution.max_m is None or resolution.outside(seen) != "coarser":
            return 1
        target = resolution.max_m * fraction
        return max(2, min(max_grid, math.ceil(seen / target - 0.05)))  # slack: 4x the target is 4 x 4

    def _caption_grid(self, part: RegionRead) -> int:
        """Tiles per side whose land covers make the caption of ``part`` when it is seen coarser than the
        trained range (1: none): tiles seen at about the coarsest trained resolution, at most
        :data:`MAX_CAPTION_GRID` a side."""
        return self._coarse_grid(part, 1.0, MAX_CAPTION_GRID)

    def _caption_over_tiles(self, inp: ImageInput, part: RegionRead, grid: int, style: str,
                            whole: ModelResult | None) -> ModelResult:
        """The caption of ``part`` with its theme sentence written from ``grid`` x ``grid`` tiles the model knows,
        when at least half of the tiles' concise captions are land-cover sentences
        (:func:`compose_cover_sentences`; the others add the covers they mention); else the region's caption as one
        image. ``whole``: that caption where already decoded (a detailed one, whose other experts read the whole
        image); a concise caption is decoded as one image only where the tiles do not make it (only the region's
        plan is kept of it). A concise result reports the tiles' resolution and how many tiles were unsure and
        why; a detailed one keeps the whole image's resolution and reasons too."""
        tiles = self._grid_tiles(inp, part, grid)
        results = self.caption_images([t.image for t in tiles], "concise", [t.key for t in tiles],
                                      [t.seen_resolution(self.image_size) for t in tiles])
        parsed = [parse_cover_sentence(r.text) for r in results]
        sentences = [s for s in parsed if s is not None]
        if 2 * len(sentences) < len(results) or not results[0].segments:
            log.info("%s: %d of %d tiles' captions name land covers: captioned as one image", inp.label,
                     len(sentences), len(results))
            self._log_outside(part, inp.label)
            if whole is None:
                whole = self.caption_images([part.image], style, [part.key],
                                            [part.seen_resolution(self.image_size)])[0]
            return whole
        text = compose_cover_sentences([s or covers_mentioned(r.text) for r, s in zip(results, parsed)])
        log.info("%s: land covers from %d x %d tiles (%s): %s", inp.label, grid, grid,
                 " | ".join(r.text for r in results), text)
        tile_theme = results[0].segments[0]
        theme = ExpertOutput(tile_theme.expert, f"[{grid} x {grid} tiles] {tile_theme.prompt}", text)
        unsure = [r for r in results if r.uncertain]
        why = sorted({re.sub(r"\s*\([0-9.]+\)", "", reason) for r in unsure for reason in r.uncertainty})
        uncertainty = [f"{len(unsure)} of {len(results)} tiles unsure: {', '.join(why)}"] if unsure else []
        names = self.model.config.expert_names
        if whole is None:  # concise: the region's plan (its scene as one image) at the tiles' resolution
            visual, scene_logits = self.encode([part.image], [part.key])
            with self.lock:
                plans, router = self.model.caption_plans(visual, style, scene_logits,
                                                         [part.seen_resolution(self.image_size)])
            seen = max(t.seen_resolution(self.image_size) or 0.0 for t in tiles) or None
            return ModelResult(fuse([theme], "caption", style, names), "caption", style,
                               replace(plans[0], resolution_m=seen), router, [theme], uncertainty)
        segments = [theme] + [s for s in whole.segments if s.expert != theme.expert]
        return replace(whole, text=fuse(segments, "caption", whole.style, names), segments=segments,
                       uncertainty=uncertainty + whole.uncertainty)

    def ask(self, item: ImageInput | str | Path | bytes, question: str, **region: Any) -> RegionResult:
        """Answer a question about a raster, an image, or a window / extent of it.

        A closed question (the answer head's: yes / no, rural / urban, a count, an area) about a region seen
        coarser than the model's trained range is answered over a grid of tiles the model sees within it,
        and the tiles' answers are combined (:func:`combine_tile_answers`: "is there a river?" is yes when
        any tile shows one). Rural / urban about a region that spans two or more of the head's region tiles
        is answered from the region's built-up share (:func:`built_up_share`) where the head can."""
        check_question(question)
        start = time.perf_counter()
        inp = ImageInput.of(item, **region)
        part = self.read_region(inp)
        kind = self.model.closed_kind(question)
        head = self.model.answer_head
        if kind == "rural_urban" and head is not None and head.has_region_classifier:
            region_grid = self._region_grid(part, head.region_tile_m)
            if region_grid > 1:
                result, hit = self._rural_urban_over_tiles(inp, part, region_grid)
                return RegionResult(result, part.read.window, part.source, hit, time.perf_counter() - start,
                                    part.ground_resolution_m)
        grid = self._answer_grid(part, kind)
        if kind is not None and grid > 1:
            result, hit = self._ask_over_tiles(inp, part, question, kind, grid)
            return RegionResult(result, part.read.window, part.source, hit, time.perf_counter() - start,
                                part.ground_resolution_m)
        self._log_outside(part, inp.label)
        hit = self._key(part.key) in self.cache
        region = self._region_mean(inp, part) if kind is not None else None
        (result,) = self.ask_images([part.image], [question], [part.key], [part.seen_resolution(self.image_size)],
                                   None if region is None else region[None])
        return RegionResult(result, part.read.window, part.source, hit, time.perf_counter() - start,
                            part.ground_resolution_m)

    def _answer_grid(self, part: RegionRead, kind: str | None) -> int:
        """Tiles per side to answer a question of closed ``kind`` (None: open) over ``part`` at a resolution the
        model knows (1: as one image). Where the answer head has region tiles and they are finer, their grid:
        each tile is then about one region tile (seen alone, as the head learnt EuroSAT's patches), and rural /
        urban (:meth:`_rural_urban_over_tiles`) and other questions about the region share the tiles' features."""
        if kind is None:
            return 1
        grid = self._coarse_grid(part, ANSWER_TILE_SEEN_FRACTION, MAX_ANSWER_GRID)
        if grid == 1:
            return 1
        head = self.model.answer_head
        if head is not None and head.region_tile_m is not None:
            grid = max(grid, self._region_grid(part, head.region_tile_m))
        return grid

    def _ask_over_tiles(self, inp: ImageInput, part: RegionRead, question: str, kind: str,
                        grid: int) -> tuple[ModelResult, bool]:
        """A closed question answered on ``grid`` x ``grid`` tiles of the region, the answers combined; the
        plan names the whole region's scene. Also says whether every tile's features came from the cache."""
        tiles = self._grid_tiles(inp, part, grid)
        hit = all(self._key(t.key) in self.cache for t in tiles + [part])
        answers = []
        for batch, visual in self._encoded_tiles(tiles):
            with self.lock:
                answers += self.model.head_answers(visual, [question] * len(batch), [kind] * len(batch))
        combined = combine_tile_answers(answers, self.model.config.answer_head.min_confidence)
        log.info("%s: %r answered over %d x %d tiles (%s): %s", inp.label, question, grid, grid,
                 ", ".join(a.label for a in answers), combined.label)
        return self._region_result(combined, part, tiles), hit

    @staticmethod
    def _region_grid(part: RegionRead, tile_m: float) -> int:
        """Tiles per side that cut the region into tiles of about ``tile_m`` metres and at least
        :data:`MIN_REGION_TILE_PX` pixels (1: the region's ground size is unknown or about one tile)."""
        if part.ground_resolution_m is None:
            return 1
        window = part.read.window
        most = max(1, min(MAX_ANSWER_GRID, min(window.width, window.height) // MIN_REGION_TILE_PX))
        return region_grid(window.width * part.ground_resolution_m, window.height * part.ground_resolution_m,
                           tile_m, most)

    def region_scene_probabilities(self, item: ImageInput | str | Path | bytes, tile_m: float,
                                   **region: Any) -> np.ndarray | None:
        """The scene head's probabilities (tiles, S) for the input cut into tiles of about ``tile_m`` metres, or
        None where it spans fewer than 2 a side (what the head's region classifier learns from)."""
        inp = ImageInput.of(item, **region)
        return self._region_tile_probabilities(inp, self.read_region(inp), tile_m)

    def _region_tile_probabilities(self, inp: ImageInput, part: RegionRead, tile_m: float) -> np.ndarray | None:
        """:meth:`region_scene_probabilities` of a region already read (``inp``: the input it was read from)."""
        grid = self._region_grid(part, tile_m)
        return None if grid <= 1 else self._tile_probabilities(self._grid_tiles(inp, part, grid))

    def region_mean_probabilities(self, item: ImageInput | str | Path | bytes, tile_m: float,
                                  **region: Any) -> np.ndarray | None:
        """:meth:`region_scene_probabilities` averaged over the tiles (S,), or None for about one tile."""
        inp = ImageInput.of(item, **region)
        return self._tile_mean(inp, self.read_region(inp), tile_m)

    def head_region_mean(self, item: ImageInput | str | Path | bytes, **region: Any) -> np.ndarray | None:
        """What the answer head sees of the input's region (:meth:`_region_mean`), reading it only where the head
        has ``region_inputs``."""
        tile_m = self._head_region_tile_m()
        return None if tile_m is None else self.region_mean_probabilities(item, tile_m, **region)

    def _region_mean(self, inp: ImageInput, part: RegionRead) -> np.ndarray | None:
        """The region's scene probabilities averaged over its tiles (S,) for an answer head with
        ``region_inputs``; None where the head has none or the region is about one tile (the head then sees
        the image's own). ``inp``: the input ``part`` was read from (its window is ``part``'s)."""
        tile_m = self._head_region_tile_m()
        return None if tile_m is None else self._tile_mean(inp, part, tile_m)

    def _head_region_tile_m(self) -> float | None:
        """The answer head's region tile size where it has ``region_inputs``, else None."""
        head = self.model.answer_head
        return head.region_tile_m if head is not None and head.region_inputs else None

    def _tile_mean(self, inp: ImageInput, part: RegionRead, tile_m: float) -> np.ndarray | None:
        """:meth:`_region_tile_probabilities` averaged over the tiles (S,), or None for about one tile."""
        probabilities = self._region_tile_probabilities(inp, part, tile_m)
        return None if probabilities is None else probabilities.mean(axis=0)

    def _tile_probabilities(self, tiles: Sequence[RegionRead]) -> np.ndarray:
        """The tiles' single-view scene probabilities (tiles, S)."""
        probabilities = []
        for _, visual in self._encoded_tiles(tiles):
            with self.lock:
                probabilities.append(softmax_rows(self.model.scene_logits(visual)))
        return np.concatenate(probabilities)

    def _rural_urban_over_tiles(self, inp: ImageInput, part: RegionRead, grid: int) -> tuple[ModelResult, bool]:
        """Rural / urban for the region, cut ``grid`` x ``grid`` into region tiles, from its built-up share (the
        head's region classifier)."""
        head = self.model.answer_head
        assert head is not None and head.has_region_classifier
        tiles = self._grid_tiles(inp, part, grid)
        hit = all(self._key(t.key) in self.cache for t in tiles + [part])
        share = built_up_share(self._tile_probabilities(tiles), self.model.config.vision.scene_classes,
                               head.region_scenes)
        answer = head.region_answer(share)
        log.info("%s: rural / urban from %d x %d tiles: built-up share %.3f, %s (%.2f)", inp.label, grid, grid,
                 share, answer.label, answer.confidence)
        return self._region_result(answer, part, tiles), hit

    def _grid_tiles(self, inp: ImageInput, part: RegionRead, grid: int) -> list[RegionRead]:
        """The region cut into ``grid`` x ``grid`` tiles, each read for the model."""
        window = part.read.window
        cols = np.linspace(window.col_off, window.col_off + window.width, grid + 1).round().astype(int)
        rows = np.linspace(window.row_off, window.row_off + window.height, grid + 1).round().astype(int)
        return [self.read_region(replace(inp, window=Window(int(c0), int(r0), int(c1 - c0), int(r1 - r0)),
                                         extent=None, extent_crs=None))
                for r0, r1 in zip(rows[:-1], rows[1:]) for c0, c1 in zip(cols[:-1], cols[1:])]

    def _encoded_tiles(self, tiles: Sequence[RegionRead]) -> Iterator[tuple[Sequence[RegionRead], Any]]:
        """The tiles in batches, each with its visual tokens (through the feature cache)."""
        for start in range(0, len(tiles), self.batch_size):
            batch = tiles[start:start + self.batch_size]
            visual, _ = self.encode([t.image for t in batch], [t.key for t in batch])
            yield batch, visual

    def _region_result(self, answer: HeadAnswer, part: RegionRead, tiles: Sequence[RegionRead]) -> ModelResult:
        """A region's combined answer as a result: the plan names the whole region's scene and the coarsest
        resolution a tile was seen at."""
        visual, scene_logits = self.encode([part.image], [part.key])
        guesses = self.model.scene_guesses(visual, scene_logits, [part.seen_resolution(self.image_size)])
        seen = max(t.seen_resolution(self.image_size) or 0.0 for t in tiles) or None
        return self.model.head_result(answer, guesses[0] if guesses else None, seen)


def _check_style(style: str) -> None:
    if style not in CAPTION_STYLES:
        raise UserInputError(f"unknown caption style {style!r}; use one of {', '.join(CAPTION_STYLES)}")
