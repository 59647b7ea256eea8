"""The ONNX Runtime backend: runs the graphs that ``rsmoe export`` wrote into ``<model dir>/onnx``.

It implements the primitives of :class:`~engine.model.routing.MoEInference` (``preprocess``, ``encode_images``,
``generate_texts``); routing, expert prompts, fusion and all tokenisation are the engine's shared code.

- Execution providers are chosen at run time from what onnxruntime offers: TensorRT, then CUDA, then CPU.
- Decoding: one mixed-adapter batch through the shared base decoder (per-row LoRA selected by
  ``adapter_mask``), greedy, with the same stopping and padding rules as transformers' ``generate`` in the
  torch backend. The KV cache never leaves the device: the present key/values of a step are ORT-allocated
  OrtValues bound (IOBinding) as the next step's past, the LoRA stacks are bound once per session, and the
  static profile ping-pongs two preallocated cache buffers. Only the last position's logits come to the host.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends import manifest as mf
from engine.backends.decoding import beam_search, pad_rows, penalise_repeats
from engine.errors import ModelDirError, UserInputError
from engine.model.answer_head import load_answer_head
from engine.model.config import ADAPTERS_DIR, CONFIG_NAME, WEIGHTS_NAME, RSMoEConfig
from engine.model.image_processing import ImageProcessor
from engine.model.routing import MoEInference, ensure_pad_token

log = logging.getLogger(__name__)

#: execution providers in order of preference; only those onnxruntime offers at run time are used
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_GPU_PROVIDERS = PROVIDER_PREFERENCE[:2]
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}
BASE_ADAPTER = "__base__"
#: greedy decoding drops finished rows from the cache once the rows still going are at most this share of it
DROP_ROWS_AT = 0.75
#: images per vision-graph call on CPU: the encoder's time per image is flat from 4 to 48 images there, but its
#: activations grow with the batch (a batch of 32 tiles peaked at 2.4 GB RSS in one call, 1.8 GB in chunks of 8)
VISION_ROWS_CPU = 8
#: rows decoded together on CPU: one-token steps stop getting cheaper per row at about this many, while the
#: KV cache (kept twice during a step: past and present, 46 KB a position a row) grows with them; a detailed
#: caption of a large batch (a router row and three expert rows a tile) decodes in groups of this many
DECODE_ROWS_CPU = 64


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ModelDirError("the onnx backend needs onnxruntime: pip install 'rsmoe[export]' "
                            "(or onnxruntime-gpu for CUDA/TensorRT)") from exc
    return onnxruntime


_shared_cpu_arena = False


def _register_shared_cpu_arena() -> None:
    """One CPU memory arena for every session of the process (once): each session's own arena keeps its peak
    for good, so the vision, bridge and decoder peaks would add up (a batch of 64 concise tiles: 1.9 GB peak RSS
    with an arena each, 1.7 GB shared; 64 detailed: 2.3 GB, 1.9 GB)."""
    global _shared_cpu_arena
    if _shared_cpu_arena:
        return
    ort = _ort()
    memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(memory, None)
    _shared_cpu_arena = True


def choose_providers(device: str = "auto", available: Sequence[str] | None = None) -> list[str]:
    """Providers for ``device`` (``auto`` | ``cpu`` | ``cuda[:N]``) among those onnxruntime offers, best first."""
    offered = list(available if available is not None else _ort().get_available_providers())
    if device == "cpu":
        return ["CPUExecutionProvider"]
    ranked = [p for p in PROVIDER_PREFERENCE if p in offered]
    if device.startswith("cuda"):
        if not any(p in offered for p in _GPU_PROVIDERS):
            raise UserInputError(f"--device {device} was asked for but onnxruntime offers no GPU provider "
                                 f"({', '.join(offered)}); install onnxruntime-gpu or use --device cpu")
        return ranked
    if device != "auto":
        raise UserInputError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    return ranked or ["CPUExecutionProvider"]


def source_digest(model_dir: Path) -> str:
    """sha256 over what an export is made from: config.json, model.safetensors and the saved adapters (the
    manifest records it, so a stale export is noticed)."""
    model_dir = Path(model_dir)
    files = [model_dir / CONFIG_NAME, model_dir / WEIGHTS_NAME, *sorted((model_dir / ADAPTERS_DIR).glob("*/*"))]
    digest = hashlib.sha256()
    for path in files:
        if path.is_file():
            digest.update(path.relative_to(model_dir).as_posix().encode())
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def checked_manifest(model_dir: Path, variant: str, export_dir: Path | None = None) -> mf.Manifest:
    """The manifest of ``model_dir``'s export (``model_dir/onnx`` unless ``export_dir``), checked to hold
    ``variant`` and to be made from the model as it is now; a :class:`ModelDirError` that says what to run
    otherwise."""
    model_dir = Path(model_dir)
    exported = Path(export_dir) if export_dir else model_dir / mf.ONNX_DIR
    manifest = mf.Manifest.load(exported, model_dir)
    if variant not in manifest.variants:
        raise ModelDirError(f"the ONNX variant {variant!r} was not exported for {model_dir} (exported: "
                            f"{', '.join(manifest.variants)}); run `rsmoe export --model {model_dir} "
                            f"--variants {variant}`")
    recorded = manifest.versions.get("source_sha256")
    if recorded and recorded != source_digest(model_dir):
        raise ModelDirError(f"{model_dir} changed (config, weights or adapters) since its ONNX export; "
                            f"run `rsmoe export --model {model_dir}`")
    return manifest


@dataclass
class _Graph:
    """A session with the numpy dtypes of its inputs."""

    session: Any
    input_types: dict[str, Any]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        cast = {k: np.ascontiguousarray(v, dtype=self.input_types[k]) for k, v in feeds.items()}
        return self.session.run(None, cast)


class _Device:
    """Where OrtValues live: the session's first provider decides (GPU providers -> cuda)."""

    def __init__(self, providers: Sequence[str], device_id: int) -> None:
        self.type = "cuda" if providers and providers[0] in _GPU_PROVIDERS else "cpu"
        self.id = device_id if self.type == "cuda" else 0

    def value(self, array: np.ndarray) -> Any:
        return _ort().OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.type, self.id)

    def empty(self, shape: Sequence[int], dtype: Any) -> Any:
        return _ort().OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.type, self.id)

    def __str__(self) -> str:
        return f"cuda:{self.id}" if self.type == "cuda" else "cpu"


class _DecoderRunner:
    """Prefill + one-token steps of the dynamic decoder graph (growing KV cache kept on the device)."""

    def __init__(self, graph: _Graph, device: _Device, lora: dict[str, Any], spec: mf.DecoderSpec) -> None:
        self.graph, self.device, self.lora, self.spec = graph, device, lora, spec
        self.float_type = graph.input_types[mf.INPUTS_EMBEDS]
        self.past_names = [mf.past_name(i, k) for i in range(spec.num_layers) for k in ("key", "value")]
        self.present_names = [mf.present_name(i, k) for i in range(spec.num_layers) for k in ("key", "value")]
        self.max_batch: int | None = None

    def _run(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        binding = self.graph.session.io_binding()
        binding.bind_cpu_input(mf.INPUTS_EMBEDS, np.ascontiguousarray(embeds, dtype=self.float_type))
        binding.bind_cpu_input(mf.ATTENTION_MASK, np.ascontiguousarray(mask, dtype=np.int64))
        binding.bind_cpu_input(mf.POSITION_IDS, np.ascontiguousarray(positions, dtype=np.int64))
        binding.bind_ortvalue_input(mf.ADAPTER_MASK, self._adapter_mask)
        for name, value in zip(self.past_names, self._past, strict=False):
            binding.bind_ortvalue_input(name, value)
        for name, value in self.lora.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(mf.LOGITS, "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device.type, self.device.id)
        self.graph.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self._past = list(outputs[1:])  # next step's past: device-resident, no copy
        return outputs[0].numpy()[:, -1, :].astype(np.float32)

    def start(self, embeds: np.ndarray, mask: np.ndarray, adapter_mask: np.ndarray) -> np.ndarray:
        """Prefill the left-padded batch; returns the last position's logits (B, V)."""
        batch = embeds.shape[0]
        self._mask = mask.astype(np.int64)
        self._adapter_mask = self.device.value(adapter_mask.astype(self.float_type))
        shape = (batch, self.spec.num_kv_heads, 0, self.spec.head_dim)
        self._past = [self.device.empty(shape, self.float_type) for _ in self.past_names]
        return self._run(embeds, self._mask, position_ids(self._mask))

    def step(self, token_embeds: np.ndarray) -> np.ndarray:
        """One token per row (B, 1, W) -> logits (B, V)."""
        self._mask = np.concatenate([self._mask, np.ones((self._mask.shape[0], 1), np.int64)], axis=1)
        return self._run(token_embeds, self._mask, position_ids(self._mask)[:, -1:])

    @property
    def can_drop_rows(self) -> bool:
        """Whether finished rows can leave the batch (a CPU cache of dynamic shape: no copy across devices)."""
        return self.device.type == "cpu"

    @property
    def past(self) -> list[Any]:
        """The key/value cache the next step reads."""
        return self._past

    @past.setter
    def past(self, values: list[Any]) -> None:
        self._past = values

    def steps_that_fit(self, max_new_tokens: int) -> int:
        """How many new tokens the cache holds after the prefill (a dynamic cache grows: all of them)."""
        return max_new_tokens

    def keep_rows(self, rows: np.ndarray) -> None:
        """Keep ``rows`` (indices into the current batch, repeats allowed) in the cache, the mask and the adapter
        choice: finished rows stop costing in the next steps, and beam search follows its chosen beams."""
        self._mask = self._mask[rows]
        self._adapter_mask = self.device.value(self._adapter_mask.numpy()[rows])
        self.past = [self.device.value(value.numpy()[rows]) for value in self.past]


class _StaticDecoderRunner(_DecoderRunner):
    """The static profile: fixed batch, one token per call, a fixed-size cache updated at ``cache_position``.
    Two preallocated cache buffer sets are swapped each step (the output of one step is the next past)."""

    can_drop_rows = False  # fixed shapes

    def __init__(self, graph: _Graph, device: _Device, lora: dict[str, Any], spec: mf.DecoderSpec,
                 profile: mf.StaticProfile) -> None:
        super().__init__(graph, device, lora, spec)
        self.profile = profile
        self.max_batch = profile.batch
        shape = (profile.batch, spec.num_kv_heads, profile.cache_length, spec.head_dim)
        # zero-filled (never uninitialised: masked slots are multiplied by 0, and 0 * NaN is NaN); one array
        # per buffer, since a CPU OrtValue shares the numpy array's memory
        self._buffers = [[device.value(np.zeros(shape, dtype=self.float_type)) for _ in self.past_names]
                         for _ in range(2)]

    def _feed(self, token_embeds: np.ndarray) -> np.ndarray:
        slot = self._slot
        mask = self._mask.copy()
        mask[:, slot + 1:] = 0
        positions = position_ids(self._mask[:, : slot + 1])[:, -1:]
        past, present = self._buffers[slot % 2], self._buffers[(slot + 1) % 2]
        binding = self.graph.session.io_binding()
        binding.bind_cpu_input(mf.INPUTS_EMBEDS, np.ascontiguousarray(token_embeds, dtype=self.float_type))
        binding.bind_cpu_input(mf.ATTENTION_MASK, mask)
        binding.bind_cpu_input(mf.POSITION_IDS, np.ascontiguousarray(positions))
        binding.bind_cpu_input(mf.CACHE_POSITION, np.array([slot], dtype=np.int64))
        binding.bind_ortvalue_input(mf.ADAPTER_MASK, self._adapter_mask)
        for name, value in zip(self.past_names, past, strict=False):
            binding.bind_ortvalue_input(name, value)
        for name, value in self.lora.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(mf.LOGITS, "cpu")
        for name, value in zip(self.present_names, present, strict=False):
            binding.bind_ortvalue_output(name, value)
        self.graph.session.run_with_iobinding(binding)
        self._slot += 1
        return binding.get_outputs()[0].numpy()[:, -1, :].astype(np.float32)

    def start(self, embeds: np.ndarray, mask: np.ndarray, adapter_mask: np.ndarray) -> np.ndarray:
        length = embeds.shape[1]
        if length >= self.profile.cache_length:
            raise UserInputError(f"the prompt needs {length} positions; the static profile holds "
                                 f"{self.profile.cache_length}: use a dynamic variant or re-export a longer cache")
        self._mask = np.zeros((embeds.shape[0], self.profile.cache_length), np.int64)
        self._mask[:, :length] = mask
        self._adapter_mask = self.device.value(adapter_mask.astype(self.float_type))
        self._slot = 0
        for slot in range(length):  # the static graph takes one token per call: prefill token by token
            logits = self._feed(embeds[:, slot: slot + 1])
        return logits

    @property
    def past(self) -> list[Any]:
        """The buffer set the next step reads (rows reordered by :meth:`keep_rows`: one index per row)."""
        return self._buffers[self._slot % 2]

    @past.setter
    def past(self, values: list[Any]) -> None:
        self._buffers[self._slot % 2] = values

    def steps_that_fit(self, max_new_tokens: int) -> int:
        """``max_new_tokens``, capped (with a warning) at what the fixed cache still holds after the prefill."""
        if self.room < max_new_tokens - 1:
            log.warning("static profile: generation capped at %d new tokens (cache full)", self.room + 1)
            return self.room + 1
        return max_new_tokens

    def step(self, token_embeds: np.ndarray) -> np.ndarray:
        if self._slot >= self.profile.cache_length:
            raise UserInputError("the static profile's KV cache is full")
        self._mask[:, self._slot] = 1
        return self._feed(token_embeds)

    @property
    def room(self) -> int:
        return self.profile.cache_length - self._slot


def position_ids(mask: np.ndarray) -> np.ndarray:
    """Positions of a left-padded batch as transformers' ``generate`` computes them (pads get 1)."""
    positions = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (e.g. features cached by another component)
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


class OnnxRSMoE(MoEInference):
    """RS-MoE on ONNX Runtime. Build with :meth:`from_model_dir`."""

    def __init__(self, model_dir: Path, config: RSMoEConfig, manifest: mf.Manifest, variant: str,
                 device: str = "auto", export_dir: Path | None = None, threads: int | None = None) -> None:
        from transformers import AutoTokenizer

        from engine.model.qformer import load_qformer_tokenizer

        ort = _ort()
        self.model_dir = Path(model_dir)
        self.export_dir = Path(export_dir) if export_dir else self.model_dir / mf.ONNX_DIR
        self.config = config
        self.manifest = manifest
        self.variant_name = variant
        self.variant = manifest.variants[variant]
        self.trained_adapters = set(manifest.trained_adapters)
        self.image_processor = ImageProcessor(config.image)
        try:
            self.tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(self.export_dir / mf.TOKENIZER_DIR))
        except (OSError, ValueError) as exc:
            raise ModelDirError(f"cannot load the tokenizer of {self.export_dir}: {exc}; "
                                "re-run `rsmoe export`") from exc
        self.qformer_tokenizer = load_qformer_tokenizer(self.export_dir / mf.QFORMER_TOKENIZER_DIR)

        providers = choose_providers(device)
        device_id = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if providers == ["CPUExecutionProvider"]:
            _register_shared_cpu_arena()
            options.add_session_config_entry("session.use_env_allocators", "1")
        if threads:  # else ONNX Runtime's default: one per physical core
            options.intra_op_num_threads = int(threads)
        self.graphs = {name: self._session(name, providers, device_id, options) for name in mf.GRAPHS}
        self.providers = list(self.graphs["decoder"].session.get_providers())
        self.device = _Device(self.providers, device_id)
        if device.startswith("cuda") and self.device.type != "cuda":
            raise UserInputError(f"--device {device} was asked for but onnxruntime could not start a GPU provider "
                                 f"(running on {', '.join(self.providers)}); use --device cpu")

        spec = manifest.decoder
        self.float_type = self.graphs["decoder"].input_types[mf.INPUTS_EMBEDS]
        self.embeddings = np.load(self.export_dir / spec.embeddings, mmap_mode="r", allow_pickle=False)
        lora = self._load_lora(spec)
        self.scene_head = self._load_scene_head()
        self.answer_head = load_answer_head(config.answer_head.enabled, self.model_dir)
        if self.variant.static is not None:
            self.decoder: _DecoderRunner = _StaticDecoderRunner(self.graphs["decoder"], self.device, lora, spec,
                                                                self.variant.static)
        else:
            self.decoder = _DecoderRunner(self.graphs["decoder"], self.device, lora, spec)
        log.info("onnx backend: %s variant on %s (%s)", variant, self.device, ", ".join(self.providers))

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def from_model_dir(cls, model_dir: str | Path, device: str = "auto", variant: str = "fp32",
                       export_dir: str | Path | None = None, threads: int | None = None) -> OnnxRSMoE:
        """Load ``model_dir``'s config and its exported graphs (``model_dir/onnx`` unless ``export_dir``);
        ``threads``: intra-op threads of each session (default: ONNX Runtime's)."""
        model_dir = Path(model_dir)
        config = RSMoEConfig.load(model_dir)
        exported = Path(export_dir) if export_dir else model_dir / mf.ONNX_DIR
        manifest = checked_manifest(model_dir, variant, exported)
        return cls(model_dir, config, manifest, variant, device, exported, threads)

    def _session(self, name: str, providers: list[str], device_id: int, options: Any) -> _Graph:
        ort = _ort()
        path = self.export_dir / self.variant.graphs[name].path
        if not path.is_file():
            raise ModelDirError(f"{path} is missing; re-run `rsmoe export --model {self.model_dir}`")
        provider_options = []
        for p in providers:
            if p == "TensorrtExecutionProvider":
                provider_options.append({"device_id": device_id,
                                         "trt_fp16_enable": self.variant.precision == "float16"})
            elif p == "CUDAExecutionProvider":
                provider_options.append({"device_id": device_id})
            else:
                provider_options.append({})
        try:
            session = ort.InferenceSession(str(path), options, providers=providers, provider_options=provider_options)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelDirError(f"onnxruntime cannot load {path}: {exc}") from exc
        types = {i.name: _NP_TYPES.get(i.type, np.float32) for i in session.get_inputs()}
        return _Graph(session, types, [o.name for o in session.get_outputs()])

    def _load_lora(self, spec: mf.DecoderSpec) -> dict[str, Any]:
        """The stacked LoRA factors as device OrtValues, bound to every decoder call without copies."""
        from safetensors.numpy import load_file

        wanted = [n for n in self.graphs["decoder"].input_types if n.startswith(mf.LORA_PREFIX)]
        try:
            tensors = load_file(str(self.export_dir / spec.lora_weights))
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise ModelDirError(f"cannot read {self.export_dir / spec.lora_weights}: {exc}; "
                                "re-run `rsmoe export`") from exc
        missing = [n for n in wanted if n not in tensors]
        if missing:
            raise ModelDirError(f"{spec.lora_weights} lacks {missing[:3]}; re-run `rsmoe export`")
        return {n: self.device.value(tensors[n].astype(self.float_type)) for n in wanted}

    def _load_scene_head(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The scene head's (weight, bias) when the model has one (``config.vision.scene_classes``)."""
        if not self.config.vision.scene_classes:
            return None
        from safetensors.numpy import load_file

        path = self.export_dir / mf.SCENE_HEAD_FILE
        try:
            tensors = load_file(str(path))
            weight, bias = tensors["weight"], tensors["bias"]
        except Exception as exc:  # a missing or damaged file, or missing tensors
            raise ModelDirError(f"cannot read the scene head {path}: {exc}; re-run `rsmoe export`") from exc
        if weight.shape[0] != len(self.config.vision.scene_classes) or bias.shape != weight.shape[:1]:
            raise ModelDirError(f"{path} does not match vision.scene_classes; re-run `rsmoe export`")
        return weight.astype(np.float32), bias.astype(np.float32)

    def scene_logits(self, visual: Any) -> np.ndarray | None:
        """The scene head on the mean visual token (B, scenes), or ``None`` without a head."""
        if self.scene_head is None:
            return None
        weight, bias = self.scene_head
        return _to_numpy(visual).astype(np.float32).mean(axis=1) @ weight.T + bias

    def describe(self) -> dict[str, Any]:
        return {"backend": "onnx", "providers": self.providers, "device": str(self.device),
                "precision": self.variant.precision, "variant": self.variant_name,
                "layout": self.manifest.layout.get("experts", "")}

    # ------------------------------------------------------------------------------------ primitives
    def _batched(self, graph: str, fn: Callable[[int, int], dict[str, np.ndarray]], total: int,
                 max_rows: int | None = None) -> np.ndarray:
        """Run ``graph`` over ``total`` rows, in chunks padded to the static batch where shapes are fixed, else
        in chunks of at most ``max_rows`` (all at once without)."""
        size = self.variant.static.batch if self.variant.static else min(total, max_rows or total)
        outputs = []
        for start in range(0, total, size):
            stop = min(start + size, total)
            feeds = fn(start, stop)
            if self.variant.static:
                feeds = {k: pad_rows(v, size) for k, v in feeds.items()}
            outputs.append(self.graphs[graph].run(feeds)[0][: stop - start])
        return np.concatenate(outputs).astype(np.float32)

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        """Images (HxWx3 uint8 arrays, PIL images or paths) -> pixels (B, 3, S, S) float32."""
        return self.image_processor(images).numpy()

    def encode_images(self, pixel_values: Any) -> np.ndarray:
        """Vision graph: pixels -> visual tokens (B, N, D) float32. Cache these per tile."""
        pixels = _to_numpy(pixel_values)
        chunk = VISION_ROWS_CPU if self.device.type == "cpu" else None
        return self._batched("vision", lambda a, b: {mf.PIXELS: pixels[a:b]}, pixels.shape[0], chunk)

    def query_embeddings(self, visual: Any, instructions: Sequence[str]) -> np.ndarray:
        """Bridge graph: visual tokens + instruction texts -> LLM prefix embeddings (B, Q, W)."""
        visual = _to_numpy(visual)
        enc = self.tokenize_instructions(instructions, return_tensors="np", pad_to_max=self.variant.static is not None)
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        return self._batched("bridge", lambda a, b: {mf.VISUAL: visual[a:b], mf.INSTRUCTION_IDS: ids[a:b],
                                                     mf.INSTRUCTION_MASK: mask[a:b]}, visual.shape[0])

    def embed(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """LM input embeddings of token ids (a lookup in the memory-mapped table)."""
        return np.asarray(self.embeddings[np.asarray(token_ids, dtype=np.int64)], dtype=np.float32)

    def language_inputs(self, prefix: np.ndarray, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ``[prefix; prompt]`` embeddings (B, L, W) and attention mask (B, L), as the torch
        backend's :meth:`~engine.model.RSMoEModel.language_inputs` builds them for generation."""
        rows = [np.concatenate([prefix[i], self.embed(self.prompt_ids(p))]) for i, p in enumerate(prompts)]
        length = max(r.shape[0] for r in rows)
        embeds = np.zeros((len(rows), length, prefix.shape[-1]), np.float32)
        mask = np.zeros((len(rows), length), np.int64)
        for i, row in enumerate(rows):
            embeds[i, length - row.shape[0]:] = row
            mask[i, length - row.shape[0]:] = 1
        return embeds, mask

    def adapter_mask(self, adapters: Sequence[str]) -> np.ndarray:
        """One-hot (B, E) row -> adapter selector (all zeros for ``__base__``)."""
        names = self.manifest.decoder.adapters
        mask = np.zeros((len(adapters), len(names)), np.float32)
        for i, name in enumerate(adapters):
            if name == BASE_ADAPTER:
                continue
            if name not in names:
                raise ModelDirError(f"adapter {name!r} is not in the exported graphs ({', '.join(names)}); "
                                    f"re-run `rsmoe export --model {self.model_dir}`")
            mask[i, names.index(name)] = 1.0
        return mask

    def generate_texts(self, visual: Any, prompts: Sequence[str], adapters: Sequence[str],
                       max_new_tokens: int, num_beams: int = 1) -> list[str]:
        """Greedy decoding (or beam search with ``num_beams`` > 1) of many rows in ONE mixed-adapter batch (row
        ``i`` through ``adapters[i]``)."""
        visual = _to_numpy(visual)
        prefix = self.query_embeddings(visual, prompts)
        embeds, mask = self.language_inputs(prefix, prompts)
        selector = self.adapter_mask(adapters)
        static = self.decoder.max_batch  # a fixed batch: every chunk padded to it
        rows_per_call = static or (DECODE_ROWS_CPU if self.device.type == "cpu" else len(prompts) * num_beams)
        size = rows_per_call // num_beams  # prompts per call
        if size < 1:
            raise UserInputError(f"{num_beams} beams do not fit the static profile's batch of {static}: "
                                 "lower generation.num_beams or use a dynamic variant")

        def rows(array: np.ndarray, start: int, stop: int) -> np.ndarray:
            return pad_rows(array[start:stop], size) if static and num_beams == 1 else array[start:stop]

        tokens: list[np.ndarray] = []
        for start in range(0, len(prompts), size):
            stop = min(start + size, len(prompts))
            chunk = (rows(embeds, start, stop), rows(mask, start, stop), rows(selector, start, stop))
            if num_beams > 1:
                eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
                generation = self.config.generation
                out = beam_search(self.decoder, self.embed, *chunk, max_new_tokens=max_new_tokens,
                                  num_beams=num_beams, eos=eos, pad=pad, length_penalty=generation.length_penalty,
                                  repetition_penalty=generation.repetition_penalty)
            else:
                out = self.greedy(*chunk, max_new_tokens)
            tokens.extend(out[: stop - start])
        return self.decode_texts(tokens)

    def greedy(self, embeds: np.ndarray, mask: np.ndarray, selector: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Greedy decoding with transformers' rules: argmax (first maximum on ties), optional repetition
        penalty over the generated tokens, rows that emitted EOS continue with the pad token, stop when
        every row is done or after ``max_new_tokens``. Returns the generated ids (B, T)."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        penalty = self.config.generation.repetition_penalty
        logits = self.decoder.start(embeds, mask, selector)
        max_new_tokens = self.decoder.steps_that_fit(max_new_tokens)
        batch = embeds.shape[0]
        done = np.zeros(batch, bool)
        generated = np.zeros((batch, 0), np.int64)
        active = np.arange(batch)  # the rows the decoder's cache holds (logits are theirs), in order
        for step in range(max_new_tokens):
            penalise_repeats(logits, generated[active], penalty)
            chosen = np.where(done[active], pad, logits.argmax(axis=-1))
            nxt = np.full(batch, pad, np.int64)
            nxt[active] = chosen
            generated = np.concatenate([generated, nxt[:, None]], axis=1)
            done[active] |= chosen == eos
            if done.all() or step == max_new_tokens - 1:
                break
            going = ~done[active]
            if self.decoder.can_drop_rows and going.sum() <= DROP_ROWS_AT * len(active):
                self.decoder.keep_rows(np.flatnonzero(going))  # finished rows stop costing
                active, chosen = active[going], chosen[going]
            logits = self.decoder.step(self.embed(chosen)[:, None, :])
        return generated
