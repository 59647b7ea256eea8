"""Trace the graph modules with ``torch.onnx.export(dynamo=True)`` and describe the files they produce.

The legacy TorchScript exporter fails on transformers 4.57's mask code; the dynamo exporter with
``torch.export.Dim.DYNAMIC`` works (STACK.md). Example sizes are chosen pairwise distinct (and distinct from
model dims such as the KV head count) so that no dynamic dim is unified with another by duck sizing.
Dynamic dims get readable names (``batch``, ``sequence``, ...) after export.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import onnx
import torch
from torch.export import Dim

from engine.backends import manifest as mf
from engine.model import RSMoEModel
from export.graphs import BridgeGraph, DecoderGraph, StackedLoRA, StaticDecoderGraph, VisionGraph, row_lora_modules

log = logging.getLogger(__name__)

DYN = Dim.DYNAMIC
# example sizes for tracing dynamic graphs
EX_BATCH, EX_SEQ, EX_PAST, EX_INSTR = 5, 7, 11, 9


@dataclass
class LMGeometry:
    """What the decoder graph needs to know about the base LM."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int

    @classmethod
    def of(cls, model: RSMoEModel) -> "LMGeometry":
        config = model.language_model.get_base_model().config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", config.num_attention_heads),
                   head_dim, config.hidden_size, config.vocab_size)


def _dtype_name(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name


def _shape(value: onnx.ValueInfoProto) -> list[int | str]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def graph_spec(path: Path, root: Path) -> mf.GraphSpec:
    """IO names, dtypes and shapes of an ONNX file (LoRA inputs left out: the manifest summarises them)."""
    model = onnx.load(str(path), load_external_data=False)
    inputs = [mf.TensorSpec(v.name, _dtype_name(v.type.tensor_type.elem_type), _shape(v))
              for v in model.graph.input if not v.name.startswith(mf.LORA_PREFIX)]
    outputs = [mf.TensorSpec(v.name, _dtype_name(v.type.tensor_type.elem_type), _shape(v)) for v in model.graph.output]
    return mf.GraphSpec(path.relative_to(root).as_posix(), inputs, outputs)


def name_dims(path: Path, names: dict[str, Sequence[str | None]]) -> None:
    """Give the symbolic dims of the listed inputs/outputs readable names (fixed dims stay numbers)."""
    model = onnx.load(str(path), load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        labels = names.get(value.name)
        if labels is None:
            continue
        for dim, label in zip(value.type.tensor_type.shape.dim, labels):
            if label is not None and not dim.HasField("dim_value"):
                dim.dim_param = label
    onnx.save(model, str(path))  # external data references are kept as they are


def _export(module: torch.nn.Module, args: tuple[Any, ...], path: Path, input_names: list[str],
            output_names: list[str], dynamic_shapes: tuple[Any, ...] | None, opset: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("tracing %s", path.name)
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True, external_data=True,
                          optimize=True, verbose=False)


def export_vision(model: RSMoEModel, path: Path, opset: int) -> None:
    """Vision encoder, dynamic batch."""
    size = model.config.image.image_size
    pixels = torch.randn(EX_BATCH, 3, size, size)
    _export(VisionGraph(model).eval(), (pixels,), path, [mf.PIXELS], [mf.VISUAL], ({0: DYN},), opset)
    name_dims(path, {mf.PIXELS: ["batch"], mf.VISUAL: ["batch"]})


def export_bridge(model: RSMoEModel, path: Path, opset: int) -> None:
    """Q-Former + projection, dynamic batch and instruction length."""
    size = model.config.image.image_size
    with torch.no_grad():
        visual = model.encode_images(torch.randn(1, 3, size, size))
    visual = visual.expand(EX_BATCH, -1, -1).contiguous()
    ids = torch.randint(1, len(model.qformer_tokenizer), (EX_BATCH, EX_INSTR))
    mask = torch.ones(EX_BATCH, EX_INSTR, dtype=torch.long)
    mask[0, -2:] = 0
    dynamic = ({0: DYN}, {0: DYN, 1: DYN}, {0: DYN, 1: DYN})
    _export(BridgeGraph(model).eval(), (visual, ids, mask), path, [mf.VISUAL, mf.INSTRUCTION_IDS, mf.INSTRUCTION_MASK],
            [mf.PREFIX], dynamic, opset)
    name_dims(path, {mf.VISUAL: ["batch"], mf.INSTRUCTION_IDS: ["batch", "instruction_length"],
                     mf.INSTRUCTION_MASK: ["batch", "instruction_length"], mf.PREFIX: ["batch"]})


def fix_dims(src: Path, dst: Path, sizes: dict[str, int]) -> None:
    """A copy of ``src`` whose named dynamic dims are fixed (the static profile of the vision and bridge
    graphs: their only dynamic dims are the batch and the instruction length)."""
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    from export.variants import save_model

    model = onnx.load(str(src))
    for name, value in sizes.items():
        make_dim_param_fixed(model.graph, name, value)
    save_model(model, dst)


def _kv_names(geo: LMGeometry, make) -> list[str]:
    return [make(i, kind) for i in range(geo.num_layers) for kind in ("key", "value")]


def _lora_args(lora: StackedLoRA) -> tuple[list[str], list[torch.Tensor]]:
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    for module in lora.modules:
        a_name, b_name = mf.lora_names(module)
        names += [a_name, b_name]
        tensors += [lora.a[module], lora.b[module]]
    return names, tensors


def export_decoder(model: RSMoEModel, lora: StackedLoRA, path: Path, opset: int) -> None:
    """The shared base decoder with per-row LoRA and a growing KV cache (all dims dynamic)."""
    geo = LMGeometry.of(model)
    b, s, p = EX_BATCH, EX_SEQ, EX_PAST
    num_adapters = len(lora.adapters)
    embeds = torch.randn(b, s, geo.hidden_size) * 0.02
    mask = torch.ones(b, p + s, dtype=torch.long)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -s:]
    adapter_mask = torch.zeros(b, num_adapters)
    adapter_mask[torch.arange(b), torch.arange(b) % num_adapters] = 1.0
    past = [torch.randn(b, geo.num_kv_heads, p, geo.head_dim) for _ in range(2 * geo.num_layers)]
    lora_in, lora_tensors = _lora_args(lora)
    past_in = _kv_names(geo, mf.past_name)
    present_out = _kv_names(geo, mf.present_name)
    dynamic = ({0: DYN, 1: DYN}, {0: DYN, 1: DYN}, {0: DYN, 1: DYN}, {0: DYN},
               [{0: DYN, 2: DYN} for _ in past], [None for _ in lora_tensors])
    with row_lora_modules(model) as rows:
        graph = DecoderGraph(model, rows, num_adapters, lora.rank).eval()
        _export(graph, (embeds, mask, positions, adapter_mask, past, lora_tensors), path,
                [mf.INPUTS_EMBEDS, mf.ATTENTION_MASK, mf.POSITION_IDS, mf.ADAPTER_MASK, *past_in, *lora_in],
                [mf.LOGITS, *present_out], dynamic, opset)
    names: dict[str, list[str | None]] = {
        mf.INPUTS_EMBEDS: ["batch", "sequence"], mf.ATTENTION_MASK: ["batch", "total_sequence"],
        mf.POSITION_IDS: ["batch", "sequence"], mf.ADAPTER_MASK: ["batch"], mf.LOGITS: ["batch"],
    }
    names.update({n: ["batch", None, "past_sequence"] for n in past_in})
    names.update({n: ["batch", None, "total_sequence"] for n in present_out})
    name_dims(path, names)


def export_static_decoder(model: RSMoEModel, lora: StackedLoRA, path: Path, opset: int, batch: int,
                          cache_length: int) -> None:
    """The decoder with every shape fixed: one token per call into a KV cache of ``cache_length`` slots."""
    geo = LMGeometry.of(model)
    num_adapters = len(lora.adapters)
    embeds = torch.randn(batch, 1, geo.hidden_size) * 0.02
    mask = torch.zeros(batch, cache_length, dtype=torch.long)
    mask[:, :4] = 1
    positions = torch.full((batch, 1), 3, dtype=torch.long)
    cache_position = torch.tensor([3], dtype=torch.long)
    adapter_mask = torch.zeros(batch, num_adapters)
    adapter_mask[torch.arange(batch), torch.arange(batch) % num_adapters] = 1.0
    past = [torch.zeros(batch, geo.num_kv_heads, cache_length, geo.head_dim) for _ in range(2 * geo.num_layers)]
    lora_in, lora_tensors = _lora_args(lora)
    with row_lora_modules(model) as rows:
        graph = StaticDecoderGraph(model, rows, num_adapters, lora.rank).eval()
        _export(graph, (embeds, mask, positions, cache_position, adapter_mask, past, lora_tensors), path,
                [mf.INPUTS_EMBEDS, mf.ATTENTION_MASK, mf.POSITION_IDS, mf.CACHE_POSITION, mf.ADAPTER_MASK,
                 *_kv_names(geo, mf.past_name), *lora_in],
                [mf.LOGITS, *_kv_names(geo, mf.present_name)], None, opset)
