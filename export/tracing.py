"""Trace the graph modules into ONNX files and describe the files they produce.

Two exporters are supported (``ExportOptions.exporter``):

- ``torchscript`` (default): ``torch.onnx.export(dynamo=False)``. STACK.md notes that it fails on
  transformers 4.57's mask code; the decoder graphs build their own 4D mask (:func:`export.graphs.additive_mask`),
  which avoids that code, and tracing the lite decoder then takes ~50 s instead of ~7 min with dynamo on
  this 2-core machine. The TorchScript exporter is deprecated upstream, hence the alternative:
- ``dynamo``: ``torch.onnx.export(dynamo=True)`` with ``torch.export.Dim.DYNAMIC``.

Both give the same graph IO. Dynamic dims are declared once per graph as ``{io name: {axis: dim name}}``.
Example sizes are pairwise distinct (and distinct from model dims such as the KV head count) so that no
dynamic dim is unified with another by duck sizing or specialised by a coincidence.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
    def of(cls, model: RSMoEModel) -> LMGeometry:
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


Axes = dict[str, dict[int, str]]


def settle_io(path: Path, axes: Axes, feeds: dict[str, np.ndarray]) -> None:
    """Write the IO shapes of ``path`` from one run on ``feeds``: the axes listed in ``axes`` get their names,
    every other dim its concrete size (exporters sometimes leave fixed output dims symbolic)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    shapes = {n: a.shape for n, a in feeds.items()}
    shapes.update({n: o.shape for n, o in zip(names, session.run(None, feeds), strict=False)})
    del session
    model = onnx.load(str(path), load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        while len(dims) < len(shapes[value.name]):
            dims.add()
        for axis, size in enumerate(shapes[value.name]):
            label = axes.get(value.name, {}).get(axis)
            dims[axis].Clear()
            if label:
                dims[axis].dim_param = label
            else:
                dims[axis].dim_value = int(size)
    onnx.save(model, str(path))  # external data references are kept as they are


def _flatten(args: tuple[Any, ...]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for arg in args:
        out.extend(_flatten(tuple(arg)) if isinstance(arg, (list, tuple)) else [arg])
    return out


def _dynamic_shapes(args: tuple[Any, ...], input_names: list[str], axes: Axes) -> tuple[Any, ...]:
    """``torch.export`` dynamic_shapes mirroring ``args`` (tensors or lists of tensors) from named axes."""
    names = iter(input_names)

    def spec(arg: Any) -> Any:
        if isinstance(arg, (list, tuple)):
            return [spec(a) for a in arg]
        return {axis: DYN for axis in axes.get(next(names), {})} or None

    return tuple(spec(a) for a in args)


def _export(module: torch.nn.Module, args: tuple[Any, ...], path: Path, input_names: list[str],
            output_names: list[str], axes: Axes, opset: int, exporter: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("tracing %s (%s exporter)", path.name, exporter)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer warnings: the parity check is what counts
        if exporter == "dynamo":
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_shapes=_dynamic_shapes(args, input_names, axes) if axes else None,
                              opset_version=opset, dynamo=True, external_data=True, optimize=True, verbose=False)
        elif exporter == "torchscript":
            try:
                torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                                  dynamic_axes=axes or None, opset_version=opset, dynamo=False)
            except Exception as exc:  # noqa: BLE001 - deprecated upstream: fall back to the supported exporter
                log.warning("TorchScript exporter failed on %s (%s); using the dynamo exporter", path.name, exc)
                _export(module, args, path, input_names, output_names, axes, opset, "dynamo")
                return
        else:
            raise ValueError(f"unknown exporter {exporter!r}")
    if exporter == "torchscript":
        _externalize(path)
    settle_io(path, axes, {n: t.numpy() for n, t in zip(input_names, _flatten(args), strict=False)})


def _externalize(path: Path) -> None:
    """Move the weights of a single-file graph into ``<name>.data`` like the dynamo exporter does."""
    from export.variants import save_model

    if not path.with_name(path.name + ".data").exists():
        save_model(onnx.load(str(path)), path)


def export_vision(model: RSMoEModel, path: Path, opset: int, exporter: str = "torchscript") -> None:
    """Vision encoder, dynamic batch."""
    size = model.config.image.image_size
    pixels = torch.randn(EX_BATCH, 3, size, size)
    _export(VisionGraph(model).eval(), (pixels,), path, [mf.PIXELS], [mf.VISUAL],
            {mf.PIXELS: {0: "batch"}, mf.VISUAL: {0: "batch"}}, opset, exporter)


def export_bridge(model: RSMoEModel, path: Path, opset: int, exporter: str = "torchscript") -> None:
    """Q-Former + projection, dynamic batch and instruction length."""
    size = model.config.image.image_size
    with torch.no_grad():
        visual = model.encode_images(torch.randn(1, 3, size, size))
    visual = visual.expand(EX_BATCH, -1, -1).contiguous()
    ids = torch.randint(1, len(model.qformer_tokenizer), (EX_BATCH, EX_INSTR))
    mask = torch.ones(EX_BATCH, EX_INSTR, dtype=torch.long)
    mask[0, -2:] = 0
    axes = {mf.VISUAL: {0: "batch"}, mf.INSTRUCTION_IDS: {0: "batch", 1: "instruction_length"},
            mf.INSTRUCTION_MASK: {0: "batch", 1: "instruction_length"}, mf.PREFIX: {0: "batch"}}
    _export(BridgeGraph(model).eval(), (visual, ids, mask), path, [mf.VISUAL, mf.INSTRUCTION_IDS, mf.INSTRUCTION_MASK],
            [mf.PREFIX], axes, opset, exporter)


def fix_dims(src: Path, dst: Path, sizes: dict[str, int]) -> None:
    """A copy of ``src`` whose named dynamic dims are fixed (the static profile of the vision and bridge
    graphs: their only dynamic dims are the batch and the instruction length)."""
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    from export.variants import save_model

    model = onnx.load(str(src))
    for name, value in sizes.items():
        make_dim_param_fixed(model.graph, name, value)
    for value in model.graph.output:  # outputs inherit the fixed sizes
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in sizes:
                dim.dim_value = sizes[dim.dim_param]
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


def export_decoder(model: RSMoEModel, lora: StackedLoRA, path: Path, opset: int,
                   exporter: str = "torchscript") -> None:
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
    axes: Axes = {mf.INPUTS_EMBEDS: {0: "batch", 1: "sequence"}, mf.ATTENTION_MASK: {0: "batch", 1: "total_sequence"},
                  mf.POSITION_IDS: {0: "batch", 1: "sequence"}, mf.ADAPTER_MASK: {0: "batch"}, mf.LOGITS: {0: "batch"}}
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in past_in})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in present_out})
    with row_lora_modules(model) as rows:
        graph = DecoderGraph(model, rows, num_adapters, lora.rank).eval()
        _export(graph, (embeds, mask, positions, adapter_mask, past, lora_tensors), path,
                [mf.INPUTS_EMBEDS, mf.ATTENTION_MASK, mf.POSITION_IDS, mf.ADAPTER_MASK, *past_in, *lora_in],
                [mf.LOGITS, *present_out], axes, opset, exporter)


def export_static_decoder(model: RSMoEModel, lora: StackedLoRA, path: Path, opset: int, batch: int,
                          cache_length: int, exporter: str = "torchscript") -> None:
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
                [mf.LOGITS, *_kv_names(geo, mf.present_name)], {}, opset, exporter)
