"""Image preprocessing shared by the engine and training: one implementation, so both see the same pixels."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import UserInputError

DIHEDRAL_VIEWS = 8  # the symmetries of a square: four rotations, with and without a flip


def dihedral(image: Any, view: int, axes: tuple[int, int] = (0, 1)) -> Any:
    """View ``view`` (0-7) of a NumPy array or torch tensor whose image rows and columns are ``axes``:
    0 is the image itself, 1-3 rotate it by 90/180/270 degrees, 4-7 do the same after a left-right flip."""
    if not 0 <= view < DIHEDRAL_VIEWS:
        raise ValueError(f"a dihedral view is 0-{DIHEDRAL_VIEWS - 1}, got {view}")
    if isinstance(image, torch.Tensor):
        flipped = image.flip(axes[1]) if view >= 4 else image
        return flipped.rot90(view % 4, dims=axes)
    flipped = np.flip(image, axis=axes[1]) if view >= 4 else image
    return np.ascontiguousarray(np.rot90(flipped, k=view % 4, axes=axes))


@dataclass
class ImageProcessorConfig:
    """How an RGB uint8 image becomes the model's pixel tensor."""

    image_size: int = 224
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageProcessorConfig":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ImageProcessor:
    """Resize (bilinear, antialiased) to a square model input and normalise.

    Accepts HxWx3 uint8 arrays (what :mod:`engine.raster` produces) or PIL images / paths.
    """

    def __init__(self, config: ImageProcessorConfig | None = None) -> None:
        self.config = config or ImageProcessorConfig()
        self._mean = torch.tensor(self.config.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(self.config.std).view(1, 3, 1, 1)

    def to_array(self, image: Any) -> np.ndarray:
        """Return an HxWx3 uint8 array for an array, a PIL image or an image file path."""
        if isinstance(image, (str, Path)):
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(image) as im:
                    return np.array(im.convert("RGB"))
            except FileNotFoundError as exc:
                raise UserInputError(f"image not found: {image}") from exc
            except (UnidentifiedImageError, OSError) as exc:
                raise UserInputError(f"cannot read image {image}: {exc}") from exc
        if hasattr(image, "convert"):  # PIL image
            return np.array(image.convert("RGB"))
        array = np.asarray(image)
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise UserInputError(f"expected an HxWx3 uint8 image, got shape {array.shape} dtype {array.dtype}")
        return array

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        """Batch of images -> float tensor (B, 3, S, S)."""
        if len(images) == 0:
            raise UserInputError("no images given")
        size = self.config.image_size
        tensors = []
        for image in images:
            array = self.to_array(image)
            if array.shape[0] == 0 or array.shape[1] == 0:
                raise UserInputError("image has zero width or height")
            t = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).unsqueeze(0).float() / 255.0
            if t.shape[-2:] != (size, size):
                t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            tensors.append(t)
        batch = torch.cat(tensors).clamp_(0.0, 1.0)
        return (batch - self._mean) / self._std
