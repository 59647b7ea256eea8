"""Frozen vision encoders: an image batch (B, 3, S, S) -> visual token features (B, N, D)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from engine.errors import ModelDirError
from engine.model.config import VisionConfig

log = logging.getLogger(__name__)


class VisionEncoder(nn.Module):
    """Base class; ``num_features`` is the width D of the returned tokens."""

    num_features: int

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class EfficientNetLiteEncoder(VisionEncoder):
    """EfficientNet-Lite0 trunk (ImageNet weights): 224 px -> 7x7 map of 1280 features = 49 tokens."""

    def __init__(self, weights_dir: Path) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        from engine.base_models import load_safetensors_checked

        meta_path = weights_dir / "config.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.net = EfficientNet.from_name(meta.get("architecture", "efficientnet-lite0").replace("_", "-"))
        state = load_safetensors_checked(weights_dir / "model.safetensors")
        self.net.load_state_dict(state, strict=True)
        self.net.set_swish(memory_efficient=False)  # plain ops: exportable, same numbers
        self.num_features = int(meta.get("num_features", 1280))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.net.extract_features(pixel_values)  # (B, C, H, W)
        return features.flatten(2).transpose(1, 2)  # (B, H*W, C)


class TransformersVisionEncoder(VisionEncoder):
    """Any transformers vision model (ViT, CLIP/SigLIP vision tower, InstructBLIP vision model):
    its ``last_hidden_state`` are the visual tokens."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.num_features = int(getattr(config, "hidden_size", 0) or config.vision_config.hidden_size)

    @classmethod
    def from_directory(cls, path: Path) -> "TransformersVisionEncoder":
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(path)
            model = AutoModel.from_pretrained(path, config=config)
        except (OSError, ValueError) as exc:
            raise ModelDirError(f"cannot load a vision model from {path}: {exc}") from exc
        tower = getattr(model, "vision_model", model)  # CLIP/SigLIP full models hold a vision tower
        return cls(tower)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state


def build_vision_encoder(config: VisionConfig, path: Path, instructblip: nn.Module | None = None) -> VisionEncoder:
    """Build the frozen encoder named by ``config`` from the resolved directory ``path``.

    ``instructblip`` is a loaded InstructBLIP model when the variant takes parts from one."""
    if config.type == "efficientnet_lite0":
        encoder: VisionEncoder = EfficientNetLiteEncoder(path)
    elif config.type == "hf":
        encoder = TransformersVisionEncoder.from_directory(path)
    elif config.type == "instructblip":
        if instructblip is None:
            raise ModelDirError("vision type 'instructblip' needs an InstructBLIP checkpoint")
        encoder = TransformersVisionEncoder(instructblip.vision_model)
    else:
        raise ModelDirError(f"unknown vision type {config.type!r} (efficientnet_lite0 | hf | instructblip)")
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder
