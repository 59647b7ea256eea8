"""Frozen vision features cached to disk, so CPU training skips the encoder after the first pass.

The encoder is frozen during stages 1 and 2, so its output for an image never changes (a fine-tuned
encoder's weights are part of the cache key): each train image is encoded once per
augmentation variant (the 8 symmetries of a square nadir image: rotations by 90 degrees, with and
without a flip) and stored as fp16 safetensors keyed by everything that affects the features.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from engine.model import RSMoEModel
from engine.model.image_processing import dihedral
from training.data.records import CaptionRecord

log = logging.getLogger(__name__)


@dataclass
class FeatureStore:
    """Visual tokens ``features[row, variant]`` (fp16) for the images ``image_ids[row]``."""

    features: torch.Tensor  # (N, V, T, D)
    image_ids: list[int]

    def __post_init__(self) -> None:
        self.row = {image_id: i for i, image_id in enumerate(self.image_ids)}

    @property
    def variants(self) -> int:
        return self.features.shape[1]

    def get(self, image_ids: Sequence[int], variants: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        rows = torch.tensor([self.row[i] for i in image_ids])
        return self.features[rows, torch.tensor(list(variants))].to(dtype)


def _tuned_vision_digest(model: RSMoEModel) -> str | None:
    """A digest of the fine-tuned encoder weights (None when the encoder is the base's as shipped)."""
    blocks = model.config.vision.tuned_blocks
    if not blocks:
        return None
    digest = hashlib.sha256()
    for name, value in sorted(model.vision.tuned_state_dict(blocks).items()):
        digest.update(name.encode())
        digest.update(value.detach().to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()


def _cache_key(model: RSMoEModel, records: Sequence[CaptionRecord], variants: int) -> str:
    """The cache file's key: the vision config, the variants, and each image's id, path, size and modification
    time (an image written again, e.g. a regenerated mosaic, is encoded again)."""
    vision = {k: v for k, v in model.config.vision.__dict__.items()
              if not k.startswith("scene_")}  # the scene head and its use: no effect on features
    files = [(r.image_id, str(r.image_path), *_size_and_time(Path(r.image_path))) for r in records]
    spec = {"vision": vision, "image": model.config.image.to_dict(), "variants": variants,
            "images": hashlib.sha256(json.dumps(files).encode()).hexdigest()}
    tuned = _tuned_vision_digest(model)
    if tuned:  # the tuned weights, not only their count, decide the features
        spec["tuned_vision"] = tuned
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _size_and_time(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@torch.no_grad()
def build_feature_store(model: RSMoEModel, records: Sequence[CaptionRecord], cache_dir: Path, name: str,
                        variants: int = 1, batch_size: int = 32,
                        encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        variant_of: Callable[[np.ndarray, int, int], np.ndarray] | None = None) -> FeatureStore:
    """Encode ``records``' images (``variants`` symmetries each) or load them from the cache.

    ``encode`` maps a pixel batch to what is stored (default: the visual tokens); ``variant_of(array,
    variant, seed)`` makes an image's variants (default: its dihedral views); ``name`` must tell different
    encodings and variant rules apart, since it is part of the file name."""
    encode = encode or model.encode_images
    from safetensors.torch import load_file, save_file

    image_ids = [r.image_id for r in records]
    path = Path(cache_dir) / f"{name}-{_cache_key(model, records, variants)}.safetensors"
    if path.is_file():
        log.info("vision features from cache %s", path)
        return FeatureStore(load_file(str(path))["features"], image_ids)
    chunks: list[torch.Tensor] = []
    jobs = [(r, v) for r in records for v in range(variants)]
    for start in tqdm(range(0, len(jobs), batch_size), desc=f"encoding {name} images", unit="batch"):
        batch = jobs[start:start + batch_size]
        arrays = [variant_of(model.image_processor.to_array(r.image_path), v, r.image_id * 64 + v) if variant_of
                  else dihedral(model.image_processor.to_array(r.image_path), v) for r, v in batch]
        chunks.append(encode(model.preprocess(arrays)).to(torch.float16).cpu())
    feats = torch.cat(chunks)
    feats = feats.view(len(records), variants, *feats.shape[1:]).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"features": feats}, str(tmp))
    tmp.replace(path)
    return FeatureStore(feats, image_ids)
