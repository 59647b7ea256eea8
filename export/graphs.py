"""The modules that are traced into ONNX graphs.

- :class:`VisionGraph`: pixels -> visual tokens (the frozen encoder; its output is what the engine caches per tile).
- :class:`BridgeGraph`: visual tokens + instruction token ids/mask -> projected query embeddings (LLM prefix).
- :class:`DecoderGraph`: the shared base causal LM with every LoRA adapter applied *per row*:
  ``y = base(x) + ((x @ A_all) * row_mask) @ B_all`` where ``A_all`` (in, E*r) / ``B_all`` (E*r, out) stack
  the E adapters along the rank axis (scale folded into B) and ``row_mask`` (B, 1, E*r) expands the
  ``adapter_mask`` input (B, E) (one-hot per row; all zeros = the base model, peft's ``__base__``). This is
  exactly peft's LoRA delta for each row's adapter, computed with two small dense matmuls whose weights are
  read once per step for the whole batch (no per-row gather), so a mixed batch costs one base pass.
- :class:`StaticDecoderGraph`: the same with a fixed-size KV cache updated at ``cache_position`` (static shapes).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, StaticLayer

from engine.errors import ModelDirError
from engine.model import RSMoEModel


class RowLoRALinear(nn.Module):
    """A base ``nn.Linear`` plus the row-selected LoRA delta of :class:`DecoderGraph` (see module docstring).

    The stacked factors and the row mask are set by the owning graph for each traced call."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None
        self.row_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.lora_a is not None and self.lora_b is not None and self.row_mask is not None
        delta = torch.matmul(torch.matmul(x, self.lora_a) * self.row_mask, self.lora_b)
        return self.base(x) + delta


@dataclass
class StackedLoRA:
    """All adapters' LoRA factors of every target module, in graph-input layout."""

    adapters: list[str]
    rank: int
    modules: list[str]  # module paths in the base LM
    a: dict[str, torch.Tensor]  # module -> (in, E*rank)
    b: dict[str, torch.Tensor]  # module -> (E*rank, out), LoRA scaling folded in


def _lora_layers(model: RSMoEModel) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    base = model.language_model.get_base_model()
    layers = [(name, m) for name, m in base.named_modules() if isinstance(m, LoraLayer)]
    for name, m in layers:
        if not isinstance(m.get_base_layer(), nn.Linear) or getattr(m, "fan_in_fan_out", False):
            raise ModelDirError(f"LoRA on {name} ({type(m.get_base_layer()).__name__}) cannot be exported: "
                                "only nn.Linear targets are supported")
        if any(m.use_dora.values()):
            raise ModelDirError(f"DoRA adapters ({name}) cannot be exported")
    return layers


@torch.no_grad()
def stack_lora(model: RSMoEModel, adapters: list[str]) -> StackedLoRA:
    """Stack the adapters' LoRA factors per target module (ranks zero-padded to the largest)."""
    layers = _lora_layers(model)
    rank = max(m.r[a] for _, m in layers for a in adapters if a in m.r)
    a_all: dict[str, torch.Tensor] = {}
    b_all: dict[str, torch.Tensor] = {}
    for name, m in layers:
        linear = m.get_base_layer()
        a_blocks, b_blocks = [], []
        for adapter in adapters:
            a = torch.zeros(linear.in_features, rank)
            b = torch.zeros(rank, linear.out_features)
            if adapter in m.lora_A:
                r = m.r[adapter]
                a[:, :r] = m.lora_A[adapter].weight.float().T
                b[:r, :] = m.lora_B[adapter].weight.float().T * m.scaling[adapter]
            a_blocks.append(a)
            b_blocks.append(b)
        a_all[name] = torch.cat(a_blocks, dim=1).contiguous()
        b_all[name] = torch.cat(b_blocks, dim=0).contiguous()
    return StackedLoRA(list(adapters), rank, [n for n, _ in layers], a_all, b_all)


@contextlib.contextmanager
def row_lora_modules(model: RSMoEModel) -> Iterator[list[RowLoRALinear]]:
    """Temporarily replace peft's LoRA layers in the base LM by :class:`RowLoRALinear` (same order as
    :func:`stack_lora`'s modules); peft's layers are put back afterwards."""
    base = model.language_model.get_base_model()
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    rows: list[RowLoRALinear] = []
    try:
        for name, layer in _lora_layers(model):
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name)
            row = RowLoRALinear(layer.get_base_layer())
            setattr(parent, child, row)
            swapped.append((parent, child, layer))
            rows.append(row)
        yield rows
    finally:
        for parent, child, layer in swapped:
            setattr(parent, child, layer)


class VisionGraph(nn.Module):
    """pixels (B, 3, S, S) -> visual tokens (B, N, D)."""

    def __init__(self, model: RSMoEModel) -> None:
        super().__init__()
        self.vision = model.vision

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values)


class BridgeGraph(nn.Module):
    """visual tokens (B, N, D) + instruction ids/mask (B, L) -> query embeddings (B, Q, W)."""

    def __init__(self, model: RSMoEModel) -> None:
        super().__init__()
        self.bridge = model.bridge

    def forward(self, visual: torch.Tensor, instruction_ids: torch.Tensor,
                instruction_mask: torch.Tensor) -> torch.Tensor:
        return self.bridge(visual, instruction_ids, instruction_mask)


class DecoderGraph(nn.Module):
    """The shared base LM with per-row LoRA and a growing KV cache (optimum's IO convention).

    ``forward(inputs_embeds, attention_mask, position_ids, adapter_mask, past, lora)`` with ``past`` the
    flat list ``[k0, v0, k1, v1, ...]`` (B, H, P, d) and ``lora`` the flat list ``[A, B]`` per module;
    returns ``(logits of the last position (B, 1, V), k0', v0', ...)`` with P + S positions."""

    def __init__(self, model: RSMoEModel, rows: list[RowLoRALinear], num_adapters: int, rank: int) -> None:
        super().__init__()
        self.lm = model.language_model.get_base_model()
        self.rows = rows
        self.num_adapters = num_adapters
        self.rank = rank

    def _set_lora(self, adapter_mask: torch.Tensor, lora: list[torch.Tensor]) -> None:
        batch = adapter_mask.shape[0]
        row_mask = adapter_mask[:, :, None].expand(batch, self.num_adapters, self.rank)
        row_mask = row_mask.reshape(batch, 1, self.num_adapters * self.rank)
        for i, row in enumerate(self.rows):
            row.lora_a, row.lora_b, row.row_mask = lora[2 * i], lora[2 * i + 1], row_mask

    def _clear_lora(self) -> None:
        for row in self.rows:
            row.lora_a = row.lora_b = row.row_mask = None

    def _run(self, cache: Cache, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
             position_ids: torch.Tensor, adapter_mask: torch.Tensor, lora: list[torch.Tensor],
             query_slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._set_lora(adapter_mask, lora)
        try:
            mask = additive_mask(attention_mask, query_slots, inputs_embeds.dtype)
            out = self.lm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                          past_key_values=cache, cache_position=query_slots, use_cache=True, logits_to_keep=1)
        finally:
            self._clear_lora()
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                adapter_mask: torch.Tensor, past: list[torch.Tensor],
                lora: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)])
        total, length = attention_mask.shape[1], inputs_embeds.shape[1]
        slots = torch.arange(length, device=inputs_embeds.device) + (total - length)
        return self._run(cache, inputs_embeds, attention_mask, position_ids, adapter_mask, lora, slots)


def additive_mask(attention_mask: torch.Tensor, query_slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, S, T) additive mask: key slot ``k`` is visible from query slot ``q`` when ``k <= q`` and the key
    is not padding. Built here rather than by transformers' mask utilities: the same numbers for every
    unpadded row, a much smaller traced graph, and no ``-inf`` (a fully masked padding row stays finite)."""
    keys = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    visible = (keys[None, :] <= query_slots[:, None])[None, None] & attention_mask[:, None, None, :].bool()
    return torch.where(visible, torch.zeros((), dtype=dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype))


class _FunctionalStaticLayer(StaticLayer):
    """A fixed-size cache layer whose update is out of place (``index_copy``), so the updated cache is a graph
    output instead of an in-place mutation of an input."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__(max_cache_len=keys.shape[2])
        self.max_batch_size, self.num_heads, _, self.head_dim = keys.shape
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys, values
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        position = (cache_kwargs or {})["cache_position"]
        self.keys = self.keys.index_copy(2, position, key_states)
        self.values = self.values.index_copy(2, position, value_states)
        return self.keys, self.values


class StaticDecoderGraph(DecoderGraph):
    """:class:`DecoderGraph` over a fixed-size cache (B, H, T, d): the step's key/values are written at
    ``cache_position`` (S,) and the whole cache is returned; ``attention_mask`` is (B, T)."""

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache_position: torch.Tensor, adapter_mask: torch.Tensor, past: list[torch.Tensor],
                lora: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        layers = [_FunctionalStaticLayer(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = Cache(layers=layers)
        return self._run(cache, inputs_embeds, attention_mask, position_ids, adapter_mask, lora, cache_position)
