"""The instruction-aware Q-Former (InstructBLIP style) and its initialisation.

Learned query tokens attend to each other and to the instruction text (self-attention over
``[queries; instruction]``) and cross-attend to the visual tokens. transformers'
``InstructBlipQFormerModel`` implements exactly this; the lite variant initialises its self-attention and
feed-forward weights from MiniLM (a 6-layer BERT), while the cross-attention layers start fresh.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, InstructBlipQFormerConfig, InstructBlipQFormerModel

from engine.errors import ModelDirError
from engine.model.config import QFormerConfig

log = logging.getLogger(__name__)


def qformer_config_from_bert(bert: BertConfig, settings: QFormerConfig, encoder_hidden_size: int) -> InstructBlipQFormerConfig:
    return InstructBlipQFormerConfig(
        vocab_size=bert.vocab_size,
        hidden_size=bert.hidden_size,
        num_hidden_layers=bert.num_hidden_layers,
        num_attention_heads=bert.num_attention_heads,
        intermediate_size=bert.intermediate_size,
        hidden_act=bert.hidden_act,
        max_position_embeddings=bert.max_position_embeddings,
        layer_norm_eps=bert.layer_norm_eps,
        pad_token_id=bert.pad_token_id,
        cross_attention_frequency=settings.cross_attention_frequency,
        encoder_hidden_size=encoder_hidden_size,
    )


def bert_to_qformer_state(bert_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map BERT weights onto Q-Former names.

    Self-attention and feed-forward weights are copied; the query tokens' own feed-forward
    (``intermediate_query`` / ``output_query``) starts as a copy of the text feed-forward; BERT's
    token-type-0 embedding is folded into the word embeddings (the Q-Former has no token types), so a
    text-only forward pass equals BERT's.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in bert_state.items():
        if key.startswith(("pooler.", "embeddings.token_type_embeddings", "embeddings.position_ids")):
            continue
        new = key.replace("embeddings.LayerNorm", "embeddings.layernorm").replace("attention.self.", "attention.attention.")
        out[new] = value
        if ".intermediate." in new:
            out[new.replace(".intermediate.", ".intermediate_query.")] = value.clone()
        elif ".output.dense." in new or ".output.LayerNorm." in new:
            if ".attention.output." not in new:
                out[new.replace(".output.", ".output_query.")] = value.clone()
    token_type = bert_state.get("embeddings.token_type_embeddings.weight")
    if token_type is not None:
        out["embeddings.word_embeddings.weight"] = out["embeddings.word_embeddings.weight"] + token_type[0]
    return out


def build_qformer_from_bert(path: Path, settings: QFormerConfig, encoder_hidden_size: int) -> InstructBlipQFormerModel:
    """A Q-Former whose text-side weights come from the BERT checkpoint at ``path``."""
    from engine.base_models import load_safetensors_checked

    try:
        bert_config = BertConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"cannot read the BERT config at {path}: {exc}") from exc
    qformer = InstructBlipQFormerModel(qformer_config_from_bert(bert_config, settings, encoder_hidden_size))
    state = bert_to_qformer_state(load_safetensors_checked(path / "model.safetensors"))
    missing, unexpected = qformer.load_state_dict(state, strict=False)
    if unexpected:
        raise ModelDirError(f"BERT checkpoint at {path} has weights the Q-Former does not: {unexpected[:5]}")
    if any("crossattention" not in k for k in missing):
        raise ModelDirError(f"BERT checkpoint at {path} lacks Q-Former weights: {[k for k in missing if 'crossattention' not in k][:5]}")
    return qformer


def build_random_qformer(settings: QFormerConfig, encoder_hidden_size: int, vocab_size: int) -> InstructBlipQFormerModel:
    """A randomly initialised Q-Former of the sizes in ``settings`` (tests, ablations)."""
    config = InstructBlipQFormerConfig(
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        intermediate_size=settings.intermediate_size,
        cross_attention_frequency=settings.cross_attention_frequency,
        encoder_hidden_size=encoder_hidden_size,
    )
    return InstructBlipQFormerModel(config)


def load_qformer_tokenizer(path: Path):
    """The Q-Former's (BERT WordPiece) tokenizer stored at ``path``."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"cannot load the Q-Former tokenizer from {path}: {exc}") from exc


class InstructionAwareQFormer(nn.Module):
    """Query tokens + Q-Former + projection to the LLM width.

    ``forward(visual, instruction_ids, instruction_mask) -> (B, num_query_tokens, llm_width)``.
    """

    def __init__(self, qformer: InstructBlipQFormerModel, num_query_tokens: int, llm_width: int,
                 visual_width: int, query_tokens: torch.Tensor | None = None,
                 projection: nn.Linear | None = None, normalize_visual: bool = True) -> None:
        super().__init__()
        hidden = qformer.config.hidden_size
        self.qformer = qformer
        if query_tokens is None:
            query_tokens = torch.randn(1, num_query_tokens, hidden) * qformer.config.initializer_range
        self.query_tokens = nn.Parameter(query_tokens.clone())
        # normalises the frozen visual tokens before cross-attention (InstructBLIP's vision tower ends in a
        # LayerNorm; a CNN trunk does not)
        self.visual_norm: nn.Module = nn.LayerNorm(visual_width) if normalize_visual else nn.Identity()
        self.projection = projection if projection is not None else nn.Linear(hidden, llm_width)

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    def forward(self, visual: torch.Tensor, instruction_ids: torch.Tensor, instruction_mask: torch.Tensor) -> torch.Tensor:
        batch = visual.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)
        query_mask = torch.ones(queries.shape[:2], dtype=instruction_mask.dtype, device=visual.device)
        visual = self.visual_norm(visual)
        out = self.qformer(
            input_ids=instruction_ids,
            attention_mask=torch.cat([query_mask, instruction_mask], dim=1),
            query_embeds=queries,
            encoder_hidden_states=visual,
            encoder_attention_mask=torch.ones(visual.shape[:2], dtype=torch.long, device=visual.device),
        )
        return self.projection(out.last_hidden_state[:, : self.num_query_tokens, :])
