"""What a request looks at: a raster path or image bytes, a window or an extent of it, a band choice.

Inputs (:class:`ImageInput`)
    A local raster path (anything :class:`engine.raster.RasterSource` opens) or encoded image bytes
    (PNG, JPEG, GeoTIFF, ... opened from memory through GDAL's ``/vsimem``), for layers the engine
    cannot open itself (the QGIS plugin renders web layers to PNG). Optionally a part of it: a pixel
    ``window`` or an ``extent`` (minx, miny, maxx, maxy) in the raster CRS or in ``extent_crs``;
    and a band choice.

Opening and identity (:func:`open_input`, :func:`raster_identity`)
    An input opens as a :class:`~engine.raster.RasterSource` with an identity string (path, size and
    mtime of a file, or a hash of the bytes) that keys the pipeline's feature cache; the same file
    facts identify the raster in a batch job's journal. :func:`resolve_window` gives the pixel window
    an input asks for, :func:`seen_resolution` the ground resolution the model sees in it.

The caption / ask pipeline (:mod:`engine.pipeline`) and batch jobs (:mod:`engine.jobs`) both start here.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import isfinite
from pathlib import Path
from typing import Any, Iterator

from engine.bands import BandSelection
from engine.errors import RasterError, UserInputError
from engine.georef import Window
from engine.raster import RasterSource
from engine.tiling import extent_to_window


def raster_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Facts that change when a raster file is replaced: absolute path, byte size, mtime (ns)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return {"path": str(path)}
    return {"path": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass(frozen=True)
class ImageInput:
    """What to look at: a raster path or image bytes, optionally a window or an extent of it.

    Parameters
    ----------
    path
        A local raster (GeoTIFF, PNG, JPEG, VRT, ... anything GDAL opens).
    data
        Encoded image bytes (PNG, JPEG, GeoTIFF, ...), instead of ``path``.
    window
        Pixel window ``[col_off, row_off, width, height]`` to look at (default: everything).
    extent
        ``(minx, miny, maxx, maxy)`` in the raster CRS, or in ``extent_crs``; instead of ``window``.
    extent_crs
        CRS of ``extent`` (``"EPSG:4326"``, WKT, ...).
    bands
        Band choice (see :class:`engine.raster.BandSelection`).
    ground_resolution_m
        Metres per pixel of the image as given (its native ground resolution), for images without
        georeferencing (e.g. a map rendering); when given it is used instead of the raster's own.
    """

    path: str | None = None
    data: bytes | None = field(default=None, repr=False)
    window: Window | None = None
    extent: tuple[float, float, float, float] | None = None
    extent_crs: str | None = None
    bands: BandSelection = field(default_factory=BandSelection)
    ground_resolution_m: float | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise UserInputError("give either a raster path or image bytes (exactly one of them)")
        if self.data is not None and len(self.data) == 0:
            raise UserInputError("the image bytes are empty")
        if self.path is not None and not str(self.path).strip():
            raise UserInputError("the raster path is empty")
        if self.window is not None and self.extent is not None:
            raise UserInputError("give either a window or an extent, not both")
        if self.extent_crs is not None and self.extent is None:
            raise UserInputError("extent_crs was given without an extent")
        if self.window is not None and not isinstance(self.window, Window):
            object.__setattr__(self, "window", Window.from_list(self.window))
        if self.extent is not None:
            try:
                values = tuple(float(v) for v in self.extent)
            except (TypeError, ValueError):
                raise UserInputError(f"an extent is minx,miny,maxx,maxy; got {self.extent!r}") from None
            if len(values) != 4:
                raise UserInputError(f"an extent is minx,miny,maxx,maxy; got {list(self.extent)!r}")
            object.__setattr__(self, "extent", values)
        if not isinstance(self.bands, BandSelection):
            object.__setattr__(self, "bands", BandSelection.parse(self.bands))
        if self.path is not None:
            object.__setattr__(self, "path", str(self.path))
        if self.ground_resolution_m is not None:
            value = self.ground_resolution_m
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (isfinite(value) and value > 0):
                raise UserInputError(f"the ground resolution must be a positive number of metres per pixel, "
                                     f"got {value!r}")
            object.__setattr__(self, "ground_resolution_m", float(value))

    @classmethod
    def of(cls, item: ImageInput | str | Path | bytes, **region: Any) -> ImageInput:
        """An :class:`ImageInput` from a path, bytes or an ImageInput (``region``: window, extent, ...)."""
        if isinstance(item, ImageInput):
            if region:
                raise UserInputError("give the window / extent / bands inside the ImageInput")
            return item
        if isinstance(item, (bytes, bytearray, memoryview)):
            return cls(data=bytes(item), **region)
        return cls(path=str(item), **region)

    @property
    def label(self) -> str:
        """How messages name the input."""
        return self.path if self.path is not None else f"the image bytes ({len(self.data or b'')} bytes)"


@contextmanager
def open_input(inp: ImageInput, min_valid_fraction: float = 0.5) -> Iterator[tuple[RasterSource, str]]:
    """Open an input as a :class:`RasterSource`; yields ``(source, identity)``.

    ``identity`` names the data (path, size, mtime; or a hash of the bytes) for cache keys.
    Errors about in-memory data name "the image bytes", not GDAL's temporary path.
    """
    if inp.path is not None:
        identity = json.dumps(raster_identity(inp.path), sort_keys=True)
        with RasterSource(inp.path, inp.bands, min_valid_fraction) as source:
            yield source, identity
        return
    from rasterio.io import MemoryFile

    assert inp.data is not None
    identity = "sha256:" + hashlib.sha256(inp.data).hexdigest()
    memfile = MemoryFile(inp.data)
    try:
        try:
            source = RasterSource(memfile.name, inp.bands, min_valid_fraction)
        except RasterError as exc:
            raise RasterError(_rename(str(exc), memfile.name, inp.label)) from None
        with source:
            try:
                yield source, identity
            except RasterError as exc:
                raise RasterError(_rename(str(exc), memfile.name, "the image bytes")) from None
    finally:
        memfile.close()


def _rename(message: str, vsi_path: str, label: str) -> str:
    name = vsi_path.rsplit("/", 1)[-1]
    message = message.replace(f"'{vsi_path}'", label).replace(vsi_path, label).replace(name, "image")
    if "cannot open" in message and "image bytes" in label:
        message += " (send PNG, JPEG or GeoTIFF bytes)"
    return message


def resolve_window(source: RasterSource, inp: ImageInput) -> Window:
    """The pixel window an input asks for: its window, its extent, or the whole raster."""
    if inp.window is not None:
        if not source.full_window.contains(inp.window):
            raise RasterError(f"window {inp.window.to_list()} lies outside {inp.label} "
                              f"({source.width} x {source.height} pixels)")
        return inp.window
    if inp.extent is not None:
        return extent_to_window(source, inp.extent, inp.extent_crs)
    return source.full_window


def seen_resolution(ground_resolution_m: float | None, width: int, height: int, image_size: int) -> float | None:
    """The ground resolution the model sees (metres per pixel of its ``image_size`` input) for a window of
    ``width`` x ``height`` pixels at ``ground_resolution_m`` metres per pixel: the read resamples the window's
    longer side to the input size. None when the native resolution is unknown."""
    if ground_resolution_m is None or not ground_resolution_m > 0:
        return None
    return float(ground_resolution_m) * max(int(width), int(height)) / float(image_size)


def check_input(inp: ImageInput) -> Window:
    """Open an input and resolve its region without reading pixels: fail fast on bad input."""
    with open_input(inp) as (source, _):
        return resolve_window(source, inp)
