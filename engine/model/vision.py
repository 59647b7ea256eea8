"""Vision encoders: an image batch (B, 3, S, S) -> visual token features (B, N, D).

Frozen by default; the EfficientNet-Lite trunk can have its top blocks fine-tuned on the target domain
(``VisionConfig.tuned_blocks``): :meth:`EfficientNetLiteEncoder.lower` / :meth:`EfficientNetLiteEncoder.upper`
split the forward pass there, so training can cache the frozen lower part.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from engine.errors import CorruptWeightsError, ModelDirError
from engine.model.config import VisionConfig

log = logging.getLogger(__name__)


class VisionEncoder(nn.Module):
    """Base class; ``num_features`` is the width D of the returned tokens."""

    num_features: int

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def tuned_modules(self, blocks: int) -> dict[str, nn.Module]:
        """The modules (by state-dict prefix) that fine-tuning the top ``blocks`` blocks changes."""
        raise ModelDirError(f"vision.tuned_blocks is supported for efficientnet_lite0 only, not {type(self).__name__}")

    def tuned_state_dict(self, blocks: int) -> dict[str, torch.Tensor]:
        """Weights and buffers of :meth:`tuned_modules` (what a model directory stores for them)."""
        return {f"{prefix}.{key}": value for prefix, module in self.tuned_modules(blocks).items()
                for key, value in module.state_dict().items()}

    def load_tuned_state_dict(self, state: dict[str, torch.Tensor], blocks: int, source: str) -> None:
        """Replace the base weights of the top ``blocks`` blocks with fine-tuned ones read from ``source``."""
        expected = self.tuned_state_dict(blocks)
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
            missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise CorruptWeightsError(f"{source}: the tuned vision weights do not match vision.tuned_blocks={blocks} "
                                      f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)


class EfficientNetLiteEncoder(VisionEncoder):
    """EfficientNet-Lite0 trunk (ImageNet weights): 224 px -> 7x7 map of 1280 features = 49 tokens.

    ``activation``: ``relu6`` keeps the network as its ImageNet weights were trained; ``swish`` replaces every
    ReLU6 by Swish, as the models trained before ``vision.activation`` existed had it (their later layers
    learnt on those features, so they keep it)."""

    def __init__(self, weights_dir: Path, activation: str = "swish") -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        from engine.base_models import load_safetensors_checked

        meta_path = weights_dir / "config.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.net = EfficientNet.from_name(meta.get("architecture", "efficientnet-lite0").replace("_", "-"))
        state = load_safetensors_checked(weights_dir / "model.safetensors")
        self.net.load_state_dict(state, strict=True)
        if activation == "swish":
            self.net.set_swish(memory_efficient=False)  # plain ops: exportable
        elif activation != "relu6":  # relu6: efficientnet_lite_pytorch builds lite networks with nn.ReLU6
            raise ModelDirError(f"unknown efficientnet activation {activation!r} (relu6 | swish)")
        self.num_features = int(meta.get("num_features", 1280))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.net.extract_features(pixel_values)  # (B, C, H, W)
        return features.flatten(2).transpose(1, 2)  # (B, H*W, C)

    def _run_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start:stop`` with the drop-connect schedule of ``extract_features``."""
        total = len(self.net._blocks)
        for idx in range(start, stop):
            rate = self.net._global_params.drop_connect_rate
            x = self.net._blocks[idx](x, drop_connect_rate=rate * idx / total if rate else rate)
        return x

    def _split(self, blocks: int) -> int:
        total = len(self.net._blocks)
        if not 0 < blocks <= total:
            raise ModelDirError(f"vision.tuned_blocks must be between 1 and {total}, got {blocks}")
        return total - blocks

    def lower(self, pixel_values: torch.Tensor, blocks: int) -> torch.Tensor:
        """Stem and all blocks below the top ``blocks``: pixels -> an intermediate map (B, C, H, W)."""
        x = self.net._swish(self.net._bn0(self.net._conv_stem(pixel_values)))
        return self._run_blocks(x, 0, self._split(blocks))

    def upper(self, lower_map: torch.Tensor, blocks: int) -> torch.Tensor:
        """The top ``blocks`` blocks and the head: :meth:`lower`'s map -> the final map (B, 1280, 7, 7)."""
        x = self._run_blocks(lower_map, self._split(blocks), len(self.net._blocks))
        return self.net._swish(self.net._bn1(self.net._conv_head(x)))

    def tuned_modules(self, blocks: int) -> dict[str, nn.Module]:
        split = self._split(blocks)
        modules: dict[str, nn.Module] = {f"net._blocks.{i}": self.net._blocks[i]
                                         for i in range(split, len(self.net._blocks))}
        return {**modules, "net._conv_head": self.net._conv_head, "net._bn1": self.net._bn1}


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
        encoder: VisionEncoder = EfficientNetLiteEncoder(path, config.activation)
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
