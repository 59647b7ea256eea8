"""``onnx/manifest.json``: what ``rsmoe export`` wrote and what the ONNX Runtime backend reads.

Layout of an exported directory (``<model dir>/onnx`` by default)::

    manifest.json           this file: opset, layout, IO names and shapes, precision, parity figures
    tokenizer/              the LM tokenizer (copied from the model, so the backend needs no base weights)
    qformer_tokenizer/      the Q-Former tokenizer
    embed_tokens.npy        the LM's input embedding table (memory-mapped; decoding embeds token ids itself)
    lora.safetensors        every adapter's LoRA weights stacked along the rank axis, scale folded into B
    fp32/ fp16/ int8/ static/   one folder per variant: vision.onnx, bridge.onnx, decoder.onnx

The names below are the graphs' IO names; ``export`` imports them from here, so both sides agree.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ModelDirError

ONNX_DIR = "onnx"
MANIFEST_NAME = "manifest.json"
FORMAT = "rsmoe-onnx/1"
EMBEDDINGS_FILE = "embed_tokens.npy"
LORA_FILE = "lora.safetensors"
SCENE_HEAD_FILE = "scene_head.safetensors"  # weight, bias (float32) of a model with a scene head
TOKENIZER_DIR = "tokenizer"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"

VARIANTS = ("fp32", "fp16", "int8", "static")
GRAPHS = ("vision", "bridge", "decoder")

# vision graph
PIXELS = "pixel_values"
VISUAL = "visual_tokens"
# bridge graph (instruction-aware Q-Former + projection)
INSTRUCTION_IDS = "instruction_ids"
INSTRUCTION_MASK = "instruction_mask"
PREFIX = "query_embeds"
# decoder graph (shared base LM with per-row LoRA)
INPUTS_EMBEDS = "inputs_embeds"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
CACHE_POSITION = "cache_position"  # static profile only: the cache slot the step writes
ADAPTER_MASK = "adapter_mask"  # (batch, num_adapters): one-hot row -> adapter, all zeros = base model
LOGITS = "logits"
LORA_PREFIX = "lora."


def past_name(layer: int, kind: str) -> str:
    """Input name of a past key/value tensor (``kind``: ``key`` | ``value``), as optimum names them."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def lora_names(module: str) -> tuple[str, str]:
    """Input names of one target module's stacked LoRA factors A (in, E*r) and B (E*r, out)."""
    return f"{LORA_PREFIX}{module}.A", f"{LORA_PREFIX}{module}.B"


@dataclass
class TensorSpec:
    """One graph input or output: dims are ints (fixed) or names (dynamic)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class GraphSpec:
    """One ONNX file (relative to the export dir) and its IO. The decoder's LoRA inputs are summarised in
    :class:`DecoderSpec` rather than listed one by one."""

    path: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSpec:
        return cls(data["path"], [TensorSpec(**t) for t in data["inputs"]], [TensorSpec(**t) for t in data["outputs"]])


@dataclass
class StaticProfile:
    """Fixed sizes of the static-shape variant (TensorRT): every graph runs on exactly these shapes; the
    backend pads a smaller batch and splits a larger one. The decoder advances one token per call over a
    fixed-size KV cache of ``cache_length`` slots."""

    batch: int
    cache_length: int
    instruction_tokens: int
    image_size: int
    step_tokens: int = 1


@dataclass
class VariantSpec:
    """One precision / shape variant and its parity figures measured at export time."""

    precision: str  # float32 | float16 | int8 (weights; activations float32)
    graphs: dict[str, GraphSpec]
    static: StaticProfile | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    decoder_bytes: int = 0  # size of the decoder graph's weights on disk

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantSpec:
        return cls(
            precision=data["precision"],
            graphs={k: GraphSpec.from_dict(v) for k, v in data["graphs"].items()},
            static=StaticProfile(**data["static"]) if data.get("static") else None,
            parity=dict(data.get("parity", {})),
            notes=data.get("notes", ""),
            decoder_bytes=int(data.get("decoder_bytes", 0)),
        )


@dataclass
class DecoderSpec:
    """The shared base LM: KV-cache geometry, the adapters stacked in the LoRA inputs, and side files."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    adapters: list[str]  # order of the adapter_mask columns and of the stacked LoRA blocks
    lora_rank: int  # per adapter (smaller ranks are zero-padded)
    lora_modules: list[str]  # target modules (paths in the base LM); inputs lora.<module>.A / .B
    lora_weights: str = LORA_FILE
    lora_bytes: int = 0  # all adapters' stacked LoRA factors (float32)
    embeddings: str = EMBEDDINGS_FILE
    logits: str = "last"  # the decoder returns the logits of the last position only


@dataclass
class Manifest:
    """The whole ``manifest.json``."""

    model_id: str
    opset: int
    layout: dict[str, str]
    decoder: DecoderSpec
    variants: dict[str, VariantSpec]
    trained_adapters: list[str]
    num_query_tokens: int
    visual_tokens: list[int]  # (N, D) of the vision graph's output for the configured image size
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format: str = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: Path) -> None:
        (Path(directory) / MANIFEST_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        if data.get("format") != FORMAT:
            raise ModelDirError(f"unsupported ONNX manifest format {data.get('format')!r} (expected {FORMAT}); "
                                "re-run `rsmoe export`")
        data["decoder"] = DecoderSpec(**data["decoder"])
        data["variants"] = {k: VariantSpec.from_dict(v) for k, v in data["variants"].items()}
        return cls(**data)

    @classmethod
    def load(cls, export_dir: Path, model_dir: Path | None = None) -> Manifest:
        """Read ``export_dir/manifest.json``; a missing export is a :class:`ModelDirError` that says what to run."""
        path = Path(export_dir) / MANIFEST_NAME
        hint = f"run `rsmoe export --model {model_dir or Path(export_dir).parent}`"
        if not path.is_file():
            raise ModelDirError(f"{export_dir} holds no exported ONNX model ({MANIFEST_NAME} missing); {hint}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise ModelDirError(f"{path} is not a valid ONNX manifest ({exc}); {hint}") from exc
