"""How raster values become the model's RGB: the band choice and the linear stretch to uint8.

:class:`BandSelection` names 1 or 3 bands by index or by name (parsed from ``"4,3,2"``, ``"B04,B03,B02"``,
``"red,green,blue"``); :class:`Stretch` maps each chosen band's values linearly to 0..255. Both are plain
values: :class:`engine.raster.RasterSource` resolves a selection against a dataset (defaults, colour
tables) and computes the stretch of a layer, as its module docstring describes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from engine.errors import RasterError


@dataclass(frozen=True)
class BandSelection:
    """Which bands become the model's RGB.

    Parameters
    ----------
    indices
        1-based band indices, 1 or 3 of them (``(4, 3, 2)`` for a Sentinel-2 stack).
    names
        Band descriptions (``"B04"``) or colour interpretations (``"red"``), 1 or 3, matched
        case-insensitively; descriptions win over colour interpretations.
    Neither: the default described in the module docstring.
    """

    indices: tuple[int, ...] | None = None
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.indices is not None and self.names is not None:
            raise RasterError("choose bands either by indices or by names, not both")
        chosen = self.indices if self.indices is not None else self.names
        if chosen is not None:
            object.__setattr__(self, "indices" if self.indices is not None else "names", tuple(chosen))
            if len(chosen) not in (1, 3):
                raise RasterError(f"choose 1 or 3 bands, got {len(chosen)}: {list(chosen)}")
        if self.indices is not None:
            for i in self.indices:
                if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 1:
                    raise RasterError(f"band indices are 1-based integers, got {list(self.indices)}")

    @classmethod
    def parse(cls, spec: str | Sequence[int | str] | None) -> BandSelection:
        """From ``"4,3,2"``, ``"B04,B03,B02"``, ``"red,green,blue"``, ``"1"``, a list, or None."""
        if spec is None or (isinstance(spec, str) and not spec.strip()):
            return cls()
        items: list[Any] = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
        if all(isinstance(i, (int, np.integer)) or (isinstance(i, str) and i.isascii() and i.isdigit()) for i in items):
            return cls(indices=tuple(int(i) for i in items))
        return cls(names=tuple(str(i) for i in items))

    def to_dict(self) -> dict[str, Any]:
        return {"indices": list(self.indices) if self.indices else None,
                "names": list(self.names) if self.names else None}


@dataclass(frozen=True)
class Stretch:
    """Linear stretch to uint8 per selected band: ``(value - lo) / (hi - lo) * 255``, clipped."""

    lo: tuple[float, ...]
    hi: tuple[float, ...]

    def apply(self, data: np.ndarray) -> np.ndarray:
        """(3, H, W) numeric -> (3, H, W) uint8."""
        lo = np.asarray(self.lo, dtype=np.float64)[:, None, None]
        hi = np.asarray(self.hi, dtype=np.float64)[:, None, None]
        scaled = (data.astype(np.float32) - lo.astype(np.float32)) * (255.0 / (hi - lo)).astype(np.float32)
        scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
        return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)

    def to_dict(self) -> dict[str, list[float]]:
        return {"lo": list(self.lo), "hi": list(self.hi)}

    @classmethod
    def from_dict(cls, data: dict[str, Sequence[float]]) -> Stretch:
        return cls(tuple(float(v) for v in data["lo"]), tuple(float(v) for v in data["hi"]))
