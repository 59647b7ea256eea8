"""Parity of exported graphs against the PyTorch model, measured at export time and kept in the manifest.

Inputs are synthetic but deterministic (random images, every adapter plus the base model in one mixed batch,
the real prompts of the config) so the figures are comparable between exports.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from engine.backends.onnx import BASE_ADAPTER, OnnxRSMoE, position_ids
from engine.model import RSMoEModel
from engine.model.config import ROUTER_ADAPTER
from engine.model.router_plan import RouterPlan
from engine.model.routing import expert_prompt

log = logging.getLogger(__name__)


def sample_rows(model: RSMoEModel, limit: int | None = None) -> tuple[list[str], list[str], list[int]]:
    """(prompts, adapters, image index) rows covering every expert, the router and the base model."""
    plan = RouterPlan(scene=None, experts=model.config.expert_names)
    prompts = [expert_prompt(model.config, e, plan, "caption", model.config.router.caption_instruction)
               for e in model.config.expert_names]
    adapters = list(model.config.expert_names)
    if ROUTER_ADAPTER in model.language_model.peft_config:
        prompts.append(model.config.router.prompt.format(instruction="How many cars are there?"))
        adapters.append(ROUTER_ADAPTER)
    prompts.append(model.config.router.caption_instruction)
    adapters.append(BASE_ADAPTER)
    if limit:
        prompts, adapters = prompts[:limit], adapters[:limit]
    return prompts, adapters, [i % 2 for i in range(len(prompts))]


def sample_images(model: RSMoEModel, n: int = 2, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    size = model.config.image.image_size
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _max_abs(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@torch.no_grad()
def measure(model: RSMoEModel, backend: OnnxRSMoE, max_new_tokens: int = 8) -> dict[str, Any]:
    """Max abs differences (vision tokens, query embeddings, last-position logits after prefill and after one
    step with past key/values), top-1 agreement, and whether greedy texts are identical."""
    static = backend.variant.static
    prompts, adapters, image_index = sample_rows(model, static.batch if static else None)
    pixels = model.preprocess(sample_images(model))
    visual = model.encode_images(pixels)
    ort_visual = backend.encode_images(pixels.numpy())
    rows = visual[image_index]

    prefix = model.query_embeddings(rows, prompts)
    ort_prefix = backend.query_embeddings(rows.numpy(), prompts)

    batch = model.language_inputs(prefix, prompts)
    mask = batch.attention_mask
    positions = torch.from_numpy(position_ids(mask.numpy()))
    lm = model.language_model
    out = lm(inputs_embeds=batch.inputs_embeds, attention_mask=mask, position_ids=positions,
             adapter_names=list(adapters), use_cache=True)
    ref_prefill = out.logits[:, -1].numpy()
    nxt = out.logits[:, -1].argmax(-1)
    mask2 = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    step_embeds = lm.get_input_embeddings()(nxt)[:, None]
    out2 = lm(inputs_embeds=step_embeds, attention_mask=mask2,
              position_ids=torch.from_numpy(position_ids(mask2.numpy()))[:, -1:], past_key_values=out.past_key_values,
              adapter_names=list(adapters), use_cache=True)
    ref_step = out2.logits[:, -1].numpy()

    selector = backend.adapter_mask(adapters)
    ort_prefill = backend.decoder.start(batch.inputs_embeds.numpy(), mask.numpy(), selector)
    ort_step = backend.decoder.step(step_embeds.numpy())

    torch_texts = model.generate_texts(rows, prompts, adapters, max_new_tokens)
    ort_texts = backend.generate_texts(rows.numpy(), prompts, adapters, max_new_tokens)
    figures = {
        "rows": len(prompts),
        "adapters": list(adapters),
        "vision_max_abs": _max_abs(visual, ort_visual),
        "bridge_max_abs": _max_abs(prefix, ort_prefix),
        "prefill_logits_max_abs": _max_abs(ref_prefill, ort_prefill),
        "step_with_past_logits_max_abs": _max_abs(ref_step, ort_step),
        "prefill_top1_agreement": float(np.mean(ref_prefill.argmax(-1) == ort_prefill.argmax(-1))),
        "step_top1_agreement": float(np.mean(ref_step.argmax(-1) == ort_step.argmax(-1))),
        "greedy_max_new_tokens": max_new_tokens,
        "greedy_rows_identical": int(sum(a == b for a, b in zip(torch_texts, ort_texts, strict=False))),
        "greedy_identical": torch_texts == ort_texts,
    }
    log.info("parity %s: %s", backend.variant_name,
             {k: v for k, v in figures.items() if k not in ("adapters",)})
    return figures
