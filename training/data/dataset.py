"""A torch ``Dataset`` over caption / VQA records that preprocesses images exactly as the engine does.

Pixels go through :class:`engine.model.image_processing.ImageProcessor` (the one implementation shared with
the engine). Optional augmentation works on the HxWx3 uint8 array BEFORE that processor and uses only the
symmetries of nadir imagery: horizontal / vertical flips and 90-degree rotations (no crops, scale or colour
changes, so a caption stays true). It is off by default; random draws come from torch's generator, which
``DataLoader`` seeds per worker, so runs are reproducible under ``torch.manual_seed``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from engine.model.image_processing import ImageProcessor, ImageProcessorConfig
from training.data.records import CaptionRecord, VQARecord

Record = Union[CaptionRecord, VQARecord]


@dataclass
class AugmentConfig:
    """Rotation-safe augmentation of nadir imagery; every switch off by default."""

    hflip: bool = False
    vflip: bool = False
    rot90: bool = False

    @property
    def enabled(self) -> bool:
        return self.hflip or self.vflip or self.rot90

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "AugmentConfig":
        data = data or {}
        return cls(**{k: bool(v) for k, v in data.items() if k in cls.__dataclass_fields__})


def augment_array(array: np.ndarray, config: AugmentConfig, generator: torch.Generator | None = None) -> np.ndarray:
    """Randomly flip / rotate an HxWx3 uint8 array by multiples of 90 degrees (a contiguous copy)."""
    if not config.enabled:
        return array
    draws = torch.randint(0, 4, (3,), generator=generator).tolist()
    out = array
    if config.hflip and draws[0] % 2:
        out = out[:, ::-1]
    if config.vflip and draws[1] % 2:
        out = out[::-1, :]
    if config.rot90 and draws[2]:
        out = np.rot90(out, k=draws[2], axes=(0, 1))
    return np.ascontiguousarray(out)


class ImageRecordDataset(Dataset):
    """Items ``{"pixel_values": (3, S, S) float tensor, "record": record, "index": int}``.

    Pass the model's own processor (``model.image_processor`` or ``ImageProcessorConfig`` from the model
    config): variants differ in size and normalisation, and the default is ``ImageProcessorConfig()``.
    The text side (prompts, targets, tokenisation) is left to the training code: it reads the record.
    """

    def __init__(
        self,
        records: Sequence[Record],
        processor: ImageProcessor | ImageProcessorConfig | None = None,
        augment: AugmentConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.records = list(records)
        if isinstance(processor, ImageProcessorConfig) or processor is None:
            processor = ImageProcessor(processor)
        self.processor = processor
        self.augment = augment or AugmentConfig()
        self.generator = generator

    def __len__(self) -> int:
        return len(self.records)

    def load_array(self, index: int) -> np.ndarray:
        """The record's image as an HxWx3 uint8 array, augmented if enabled."""
        array = self.processor.to_array(self.records[index].image_path)
        if not array.flags.writeable:  # PIL-backed arrays are read-only; torch warns on those
            array = array.copy()
        return augment_array(array, self.augment, self.generator)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pixel_values = self.processor([self.load_array(index)])[0]
        return {"pixel_values": pixel_values, "record": self.records[index], "index": index}


def collate_records(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``pixel_values``; keep records and indices as lists."""
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "records": [item["record"] for item in batch],
        "indices": [item["index"] for item in batch],
    }


def scene_variant(array: np.ndarray, variant: int, seed: int) -> np.ndarray:
    """Variant ``variant`` of an HxWx3 uint8 image for scene-head training: dihedral view ``variant % 8``;
    variants above 0 also get a random zoom (a square crop of 65-100% of the side), a brightness / contrast /
    saturation change, in some a percentile stretch like the engine's raster reads or a blur (coarser
    imagery), all drawn from ``seed``. Variant 0 is the image as it is. The scene class stays true under all of
    these, while sensors, resolutions and stretches vary."""
    from engine.model.image_processing import dihedral

    out = dihedral(array, variant % 8)
    if variant == 0:
        return out
    rng = np.random.default_rng(seed)
    h, w = out.shape[:2]
    side = int(min(h, w) * rng.uniform(0.65, 1.0))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    x = out[top:top + side, left:left + side].astype(np.float32)
    if rng.random() < 0.3:  # the engine's 2-98 percentile stretch
        lo, hi = np.percentile(x, 2), np.percentile(x, 98)
        x = (x - lo) * (255.0 / max(hi - lo, 1.0))
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(0.7, 1.3)  # saturation
    x = (x - x.mean()) * rng.uniform(0.75, 1.25) + x.mean() * rng.uniform(0.8, 1.2)  # contrast, brightness
    if rng.random() < 0.2:  # a blur: what a coarser sensor gives
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None]
        small = max(8, int(side * rng.uniform(0.3, 0.6)))
        t = torch.nn.functional.interpolate(t, size=(small, small), mode="bilinear", antialias=True)
        x = torch.nn.functional.interpolate(t, size=(side, side), mode="bilinear")[0].permute(1, 2, 0).numpy()
    return np.ascontiguousarray(np.clip(x, 0, 255).astype(np.uint8))
