"""Reading rasters for the model: windows, band choice, a global stretch, nodata, resampling.

Everything the engine reads from a raster goes through :class:`RasterSource` (rasterio / GDAL, so
any raster GDAL opens: GeoTIFF, COG, VRT, JPEG2000, PNG/JPEG without georeferencing, ...).

Band choice (:class:`BandSelection`)
    ``indices`` (1-based) or ``names`` (band descriptions such as ``"B04"``, else colour
    interpretations such as ``"red"``), 1 or 3 bands; a single band is replicated to RGB.
    Default: the bands whose colour interpretation is red, green, blue if the raster has them,
    otherwise bands 1, 2, 3; a one- or two-band raster (grey, grey + alpha) gives its first band,
    expanded through the colour table when that band is paletted.

Values to uint8 (:class:`Stretch`)
    uint8 bands are used as they are. Any other type (uint16, int16, float32, ...) is stretched
    linearly between a low and a high percentile per band (2nd / 98th by default), clipped to
    0..255. The percentiles come from ONE decimated read of the whole raster (``out_shape`` at most
    ``stats_size`` pixels on the longer side, valid pixels only), computed lazily on first use and
    reused for every tile, so neighbouring tiles of one layer get the same colours. A job may pass
    the stretch of an earlier run back in (``RasterSource(..., stretch=...)``) to reproduce it.

Nodata and masks
    The dataset mask (nodata values, internal masks, alpha band; for floats also NaN/inf) marks
    the valid pixels. A tile whose valid fraction is below ``min_valid_fraction`` (default 0.5)
    is returned as skipped, with a reason and no image, and only its mask is read. Invalid pixels
    of a returned image are black (0, 0, 0).

Resampling
    A tile is read at the model input size through rasterio's ``out_shape`` (GDAL uses overviews
    when the file has them): bilinear, or average when it shrinks by a factor of two or more.
    Memory is bounded by the window's output size, never by the raster size.

Georeferencing
    :class:`GeoReference` carries size, affine transform and CRS (``pyproj.CRS``). A raster without
    a CRS (plain PNG/JPEG, world file without ``.prj``, GCP-only scenes) is ``georeferenced=False``:
    it is worked in pixel space with the transform ``x = col, y = -row`` (the way QGIS shows such an
    image), and rasterio's ``NotGeoreferencedWarning`` is silenced. ``ground_resolution`` is in metres
    per pixel measured on the ellipsoid at the raster centre (so it is right for EPSG:4326 and for
    EPSG:3857, where the nominal pixel size overstates the ground by 1/cos(latitude)).

Errors
    A missing path raises :class:`engine.errors.InputNotFoundError`; anything GDAL cannot open or
    read (corrupt or truncated file, a text file named ``.tif``, a read failure mid-file) raises
    :class:`engine.errors.RasterError` with a one-line message naming the file; bad band choices
    and windows raise :class:`engine.errors.RasterError` too. No rasterio exception escapes.

A :class:`RasterSource` holds one open GDAL dataset: use one per thread.
"""
from __future__ import annotations

import logging
import math
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import rasterio
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window as RioWindow

from engine.errors import InputNotFoundError, RasterError

log = logging.getLogger(__name__)

#: The transform used for rasters without georeferencing: x = column, y = -row (as QGIS shows them).
PIXEL_TRANSFORM = Affine(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)

#: Shrink factor from which tiles are read with average instead of bilinear resampling.
AVERAGE_FROM_FACTOR = 2.0


# --------------------------------------------------------------------------------------------
# Parameters and results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """A pixel window: column / row offset and size (integers, like rasterio's ``Window``)."""

    col_off: int
    row_off: int
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("col_off", "row_off", "width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) != value:
                raise RasterError(f"window {name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.col_off < 0 or self.row_off < 0:
            raise RasterError(f"window {self.to_list()} has a negative offset")
        if self.width <= 0 or self.height <= 0:
            raise RasterError(f"window {self.to_list()} is empty (width and height must be > 0)")

    @classmethod
    def from_list(cls, values: Sequence[int]) -> Window:
        """Window from ``[col_off, row_off, width, height]``."""
        if len(values) != 4:
            raise RasterError(f"a window is [col_off, row_off, width, height], got {list(values)!r}")
        return cls(*values)

    @classmethod
    def full(cls, width: int, height: int) -> Window:
        return cls(0, 0, width, height)

    def to_list(self) -> list[int]:
        """``[col_off, row_off, width, height]`` (the GeoJSON ``window`` property)."""
        return [self.col_off, self.row_off, self.width, self.height]

    def to_rasterio(self) -> RioWindow:
        return RioWindow(self.col_off, self.row_off, self.width, self.height)

    @property
    def col_end(self) -> int:
        return self.col_off + self.width

    @property
    def row_end(self) -> int:
        return self.row_off + self.height

    def intersection(self, other: Window) -> Window | None:
        """The overlap of two windows, or None when they do not overlap."""
        c0, r0 = max(self.col_off, other.col_off), max(self.row_off, other.row_off)
        c1, r1 = min(self.col_end, other.col_end), min(self.row_end, other.row_end)
        if c1 <= c0 or r1 <= r0:
            return None
        return Window(c0, r0, c1 - c0, r1 - r0)

    def contains(self, other: Window) -> bool:
        return (other.col_off >= self.col_off and other.row_off >= self.row_off
                and other.col_end <= self.col_end and other.row_end <= self.row_end)


_COLORINTERP_NAMES = {ci.name for ci in ColorInterp}


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


@dataclass
class TileRead:
    """The result of reading a window.

    Attributes
    ----------
    image
        (H, W, 3) uint8 RGB, invalid pixels black; None when the tile is skipped.
    valid_fraction
        Share of valid (not nodata / masked) pixels, measured at the output size.
    window
        The window read, in raster pixels.
    valid_mask
        (H, W) bool, True where valid; None when the tile is skipped.
    skipped
        Why the tile was not read (e.g. too little valid data), else None.
    """

    image: np.ndarray | None
    valid_fraction: float
    window: Window
    valid_mask: np.ndarray | None = None
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is None


@dataclass(frozen=True)
class GeoReference:
    """Where a raster's pixels lie: size, affine transform (pixel -> CRS) and CRS.

    For a raster without a CRS, ``crs`` is None and ``transform`` is :data:`PIXEL_TRANSFORM`.
    Plain data, independent of an open dataset, so jobs can build footprints after closing it.
    """

    width: int
    height: int
    transform: Affine
    crs: CRS | None = None

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None

    @property
    def crs_string(self) -> str | None:
        """``"EPSG:32618"`` when the CRS has an authority code, else its WKT; None in pixel space."""
        if self.crs is None:
            return None
        auth = self.crs.to_authority(min_confidence=90)
        return f"{auth[0]}:{auth[1]}" if auth else self.crs.to_wkt()

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) of the whole raster in its CRS (or pixel space)."""
        return window_bounds(self.transform, Window.full(self.width, self.height))

    def ground_resolution_at(self, col: float, row: float) -> tuple[float, float] | None:
        """Metres per pixel along columns and rows at pixel (col, row), on the CRS's ellipsoid.

        None for a raster without georeferencing or where the CRS cannot be evaluated.
        """
        if self.crs is None:
            return None
        try:
            geodetic = self.crs.geodetic_crs or CRS.from_epsg(4326)
            to_geo = cached_transformer(self.crs.to_wkt(), geodetic.to_wkt())
            t = self.transform
            xs, ys = apply_transform(t, np.array([col, col + 1.0, col]), np.array([row, row, row + 1.0]))
            lon, lat = to_geo.transform(xs, ys)
            if not (np.all(np.isfinite(lon)) and np.all(np.isfinite(lat))):
                raise ValueError("point outside the CRS's area")
            geod = geodetic.get_geod()
            _, _, dist = geod.inv([lon[0], lon[0]], [lat[0], lat[0]], [lon[1], lon[2]], [lat[1], lat[2]])
            res = (float(dist[0]), float(dist[1]))
            if not all(math.isfinite(r) and r > 0 for r in res):
                raise ValueError("degenerate pixel")
            return res
        except Exception as exc:  # pyproj raises several types; fall back to the nominal size
            unit = self.crs.axis_info[0].unit_conversion_factor if self.crs.axis_info else None
            if self.crs.is_projected and unit:
                t = self.transform
                res = (math.hypot(t.a, t.d) * unit, math.hypot(t.b, t.e) * unit)
                log.warning("ground resolution from the nominal pixel size (%s)", exc)
                return res
            log.warning("cannot compute the ground resolution: %s", exc)
            return None


def apply_transform(transform: Affine, cols: Any, rows: Any) -> tuple[Any, Any]:
    """``(x, y)`` of pixel coordinates (scalars or arrays) under an affine transform."""
    t = transform
    return t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f


def window_bounds(transform: Affine, window: Window) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) of a window's four corners under ``transform``."""
    cols = np.array([window.col_off, window.col_end, window.col_end, window.col_off], dtype=float)
    rows = np.array([window.row_off, window.row_off, window.row_end, window.row_end], dtype=float)
    xs, ys = apply_transform(transform, cols, rows)
    return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())


_TRANSFORMERS: dict[tuple[str, str], Transformer] = {}


def cached_transformer(src_wkt: str, dst_wkt: str) -> Transformer:
    """A cached always_xy Transformer (x = easting / longitude first)."""
    key = (src_wkt, dst_wkt)
    if key not in _TRANSFORMERS:
        _TRANSFORMERS[key] = Transformer.from_crs(CRS.from_wkt(src_wkt), CRS.from_wkt(dst_wkt), always_xy=True)
    return _TRANSFORMERS[key]


# --------------------------------------------------------------------------------------------
# Error handling
# --------------------------------------------------------------------------------------------
@contextmanager
def _quiet() -> Iterator[None]:
    """Silence rasterio's NotGeoreferencedWarning (pixel-space rasters are supported on purpose)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


def _gdal_message(exc: BaseException) -> str:
    """GDAL's own words for a failure, on one line, without the path (we add it ourselves)."""
    parts = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 4:
        text = " ".join(str(seen).split())
        if text and "See previous exception" not in text:
            parts.append(text)
        seen = seen.__cause__ or seen.__context__
    parts = list(dict.fromkeys(parts))
    if len(parts) > 2:
        parts = [parts[0], parts[-1]]  # GDAL's outermost and root-cause messages
    text = "; ".join(parts) or type(exc).__name__
    return text[:300]


def _is_virtual(path: str) -> bool:
    return path.startswith("/vsi") or "://" in path or re.match(r"^[A-Z][A-Z0-9_]+:", path) is not None


# --------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------
class RasterSource:
    """An open raster, read in windows as RGB uint8 for the model.

    Parameters
    ----------
    path
        Any raster GDAL opens (a file path, or a GDAL path such as ``/vsizip/...``).
    bands
        Band choice; default as in the module docstring.
    min_valid_fraction
        Tiles with less valid data than this are skipped (0..1, default 0.5).
    percentiles
        Low / high percentiles of the global stretch for non-uint8 data.
    stretch
        A stretch to use instead of computing one (e.g. from a resumed job's journal).
    stats_size
        Longer side, in pixels, of the decimated read that the stretch statistics come from.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        bands: BandSelection | None = None,
        min_valid_fraction: float = 0.5,
        *,
        percentiles: tuple[float, float] = (2.0, 98.0),
        stretch: Stretch | None = None,
        stats_size: int = 1024,
    ) -> None:
        self.path = str(path)
        if not 0.0 <= min_valid_fraction <= 1.0:
            raise RasterError(f"min_valid_fraction must lie in 0..1, got {min_valid_fraction}")
        lo_p, hi_p = percentiles
        if not 0.0 <= lo_p < hi_p <= 100.0:
            raise RasterError(f"stretch percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
        self.min_valid_fraction = float(min_valid_fraction)
        self.percentiles = (float(lo_p), float(hi_p))
        self.stats_size = int(stats_size)
        self.bands = bands or BandSelection()
        if not _is_virtual(self.path) and not Path(self.path).exists():
            raise InputNotFoundError(f"raster not found: '{self.path}'")
        if not _is_virtual(self.path) and Path(self.path).is_dir() and not self.path.lower().endswith(".gdb"):
            raise RasterError(f"'{self.path}' is a directory, not a raster file")
        try:
            with _quiet():
                self._ds = rasterio.open(self.path)
        except (RasterioError, OSError) as exc:
            log.debug("rasterio.open failed", exc_info=True)
            raise RasterError(
                f"cannot open '{self.path}' as a raster: not a format GDAL reads, or the file is "
                f"damaged or truncated ({_gdal_message(exc)})"
            ) from None
        try:
            self._setup(stretch)
        except BaseException:
            self._ds.close()
            raise

    def _setup(self, stretch: Stretch | None) -> None:
        ds = self._ds
        if ds.count == 0:
            subs = list(ds.subdatasets)[:3]
            hint = f"; open one of its subdatasets, e.g. {subs[0]!r}" if subs else ""
            raise RasterError(f"'{self.path}' holds no raster bands{hint}")
        with _quiet():
            crs = ds.crs
            transform = ds.transform
        if crs is not None:
            try:
                pcrs: CRS | None = CRS.from_wkt(crs.to_wkt())
            except Exception as exc:  # pyproj.exceptions.CRSError and friends
                log.warning("'%s': CRS not understood (%s); treating the raster as not georeferenced", self.path, exc)
                pcrs = None
        else:
            pcrs = None
            if not transform.is_identity:
                log.warning("'%s' has a geotransform but no CRS: worked in pixel space", self.path)
            elif ds.gcps[0]:
                log.warning("'%s' is georeferenced by GCPs only: worked in pixel space", self.path)
        self.georef = GeoReference(ds.width, ds.height, transform if pcrs is not None else PIXEL_TRANSFORM, pcrs)
        self.band_indices, self._palette = self._resolve_bands()
        unique = tuple(dict.fromkeys(self.band_indices))
        self._unique_bands = list(unique)
        self._band_pos = [unique.index(b) for b in self.band_indices]
        dtypes = {ds.dtypes[b - 1] for b in unique}
        self.dtype = str(np.result_type(*dtypes))
        self._is_float = np.issubdtype(np.dtype(self.dtype), np.floating)
        self._needs_stretch = self.dtype != "uint8" and self._palette is None
        if stretch is not None and len(stretch.lo) != len(unique):
            raise RasterError(f"the given stretch has {len(stretch.lo)} bands, the selection {len(unique)}")
        self._stretch = stretch
        flags = [ds.mask_flag_enums[b - 1] for b in unique]
        self._all_valid = all(f == [MaskFlags.all_valid] for f in flags) and not self._is_float
        self._ground_res: tuple[float, float] | None | bool = False  # False: not computed yet

    def _resolve_bands(self) -> tuple[tuple[int, int, int], np.ndarray | None]:
        ds = self._ds
        count = ds.count
        sel = self.bands
        if sel.indices is not None:
            bad = [i for i in sel.indices if i > count]
            if bad:
                raise RasterError(f"'{self.path}' has {count} band(s); band index {bad[0]} does not exist")
            idx = tuple(sel.indices)
        elif sel.names is not None:
            descriptions = [(d or "").strip().lower() for d in ds.descriptions]
            interps = [ci.name.lower() for ci in ds.colorinterp]
            idx_list = []
            for name in sel.names:
                key = name.strip().lower()
                hits = [i + 1 for i, d in enumerate(descriptions) if d and d == key]
                if not hits:
                    hits = [i + 1 for i, c in enumerate(interps) if c == key]
                if not hits:
                    known = [d for d in ds.descriptions if d] or interps
                    raise RasterError(f"'{self.path}' has no band named {name!r} (bands: {', '.join(known)})")
                if len(hits) > 1:
                    raise RasterError(f"'{self.path}': band name {name!r} matches bands {hits}; use indices")
                idx_list.append(hits[0])
            idx = tuple(idx_list)
        else:
            interps = list(ds.colorinterp)
            rgb = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
            if all(ci in interps for ci in rgb):
                idx = tuple(interps.index(ci) + 1 for ci in rgb)
            elif count >= 3:
                idx = (1, 2, 3)
            else:
                idx = (1,)
        if len(idx) == 1:
            idx = idx * 3
        palette = None
        if sel == BandSelection() and len(set(idx)) == 1 and ds.colorinterp[idx[0] - 1] == ColorInterp.palette:
            try:
                cmap = ds.colormap(idx[0])
                palette = np.zeros((max(256, max(cmap) + 1), 3), dtype=np.uint8)
                for value, rgba in cmap.items():
                    palette[value] = rgba[:3]
            except (ValueError, RasterioError):
                palette = None
        return (idx[0], idx[1], idx[2]), palette

    # -- properties --------------------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.georef.width

    @property
    def height(self) -> int:
        return self.georef.height

    @property
    def crs(self) -> CRS | None:
        return self.georef.crs

    @property
    def transform(self) -> Affine:
        return self.georef.transform

    @property
    def georeferenced(self) -> bool:
        return self.georef.georeferenced

    @property
    def count(self) -> int:
        return self._ds.count

    @property
    def ground_resolution_xy(self) -> tuple[float, float] | None:
        """Metres per pixel (along columns, along rows) at the raster centre; None in pixel space."""
        if self._ground_res is False:
            self._ground_res = self.georef.ground_resolution_at(self.width / 2.0, self.height / 2.0)
        return self._ground_res  # type: ignore[return-value]

    @property
    def ground_resolution(self) -> float | None:
        """Metres per pixel at the raster centre (mean of both axes); None in pixel space."""
        xy = self.ground_resolution_xy
        return None if xy is None else (xy[0] + xy[1]) / 2.0

    def ground_resolution_of(self, window: Window) -> float | None:
        """Metres per raster pixel at a window's centre (varies over large EPSG:4326/3857 layers)."""
        xy = self.georef.ground_resolution_at(window.col_off + window.width / 2.0, window.row_off + window.height / 2.0)
        return None if xy is None else (xy[0] + xy[1]) / 2.0

    @property
    def stretch(self) -> Stretch | None:
        """The global stretch (computed once, on first use); None for uint8 and paletted data."""
        if not self._needs_stretch:
            return None
        if self._stretch is None:
            self._stretch = self._compute_stretch()
        return self._stretch

    @property
    def full_window(self) -> Window:
        return Window.full(self.width, self.height)

    # -- reading -----------------------------------------------------------------------------
    def _compute_stretch(self) -> Stretch:
        scale = min(1.0, self.stats_size / max(self.width, self.height))
        shape = (max(1, round(self.height * scale)), max(1, round(self.width * scale)))
        data = self._guarded(
            "compute statistics of",
            lambda: self._ds.read(self._unique_bands, out_shape=(len(self._unique_bands), *shape),
                                  masked=True, resampling=Resampling.nearest),
        )
        lo_p, hi_p = self.percentiles
        lo, hi = [], []
        for band, arr in zip(self._unique_bands, data):
            values = arr.compressed()
            values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
            if values.size == 0:
                log.warning("'%s' band %d has no valid pixels in the statistics read", self.path, band)
                lo.append(0.0)
                hi.append(1.0)
                continue
            a, b = np.percentile(values.astype(np.float64), [lo_p, hi_p])
            if not b > a:
                a, b = float(values.min()), float(values.max())
                if not b > a:
                    b = a + 1.0
            lo.append(float(a))
            hi.append(float(b))
        stretch = Stretch(tuple(lo), tuple(hi))
        log.info("'%s': stretch bands %s from %s x %s sample: %s", self.path, self._unique_bands, shape[1], shape[0],
                 stretch.to_dict())
        return stretch

    def _guarded(self, what: str, fn: Any, window: Window | None = None) -> Any:
        where = f"window {window.to_list()} of " if window is not None else ""
        try:
            with _quiet():
                return fn()
        except (RasterioError, OSError, ValueError) as exc:
            log.debug("read failed", exc_info=True)
            raise RasterError(
                f"cannot {what} {where}'{self.path}': the file is damaged, truncated or unreadable "
                f"({_gdal_message(exc)})"
            ) from None

    def _check_window(self, window: Window) -> None:
        if not self.full_window.contains(window):
            raise RasterError(
                f"window {window.to_list()} lies outside '{self.path}' ({self.width} x {self.height} pixels)"
            )

    def _read(self, window: Window, out_shape: tuple[int, int], min_valid: float) -> TileRead:
        self._check_window(window)
        height, width = out_shape
        rwin = window.to_rasterio()
        if self._all_valid:
            mask = np.ones(out_shape, dtype=bool)
        else:
            mask = self._guarded(
                "read the mask of",
                lambda: self._ds.dataset_mask(window=rwin, out_shape=out_shape, resampling=Resampling.nearest) > 0,
                window,
            )
        valid = float(mask.mean())
        if valid < min_valid or valid == 0.0:
            return self._skipped(window, valid, min_valid)
        shrink = min(window.width / width, window.height / height)
        if (window.width, window.height) == (width, height):
            resampling = Resampling.nearest
        elif shrink >= AVERAGE_FROM_FACTOR:
            resampling = Resampling.average
        else:
            resampling = Resampling.bilinear
        data = self._guarded(
            "read",
            lambda: self._ds.read(self._unique_bands, window=rwin,
                                  out_shape=(len(self._unique_bands), height, width), resampling=resampling),
            window,
        )
        if self._is_float:
            mask &= np.all(np.isfinite(data), axis=0)
            valid = float(mask.mean())
            if valid < min_valid or valid == 0.0:
                return self._skipped(window, valid, min_valid)
        if self._palette is not None:
            rgb = self._palette[np.clip(data[0], 0, len(self._palette) - 1).astype(np.intp)]
        else:
            if self._needs_stretch:
                stretch = self.stretch
                assert stretch is not None
                data8 = stretch.apply(data)
            else:
                data8 = data.astype(np.uint8, copy=False)
            rgb = np.stack([data8[p] for p in self._band_pos], axis=-1)
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        rgb[~mask] = 0
        return TileRead(image=rgb, valid_fraction=valid, window=window, valid_mask=mask)

    def _skipped(self, window: Window, valid: float, min_valid: float) -> TileRead:
        if valid == 0.0:
            reason = "no valid pixels (nodata)"
        else:
            shown = f"{valid:.0%}" if valid >= 0.01 else f"{valid:.2%}"
            reason = f"only {shown} valid pixels (minimum {min_valid:.0%})"
        return TileRead(image=None, valid_fraction=valid, window=window, skipped=reason)

    def read_tile(self, window: Window, out_size: int | tuple[int, int] | None = 224) -> TileRead:
        """Read a window as RGB uint8 resampled to ``out_size``.

        Parameters
        ----------
        window
            Pixel window inside the raster.
        out_size
            ``S`` for an S x S image (the model input), ``(height, width)``, or None for the
            window's own size.

        Returns
        -------
        TileRead
            Skipped (no image) when the valid fraction is below ``min_valid_fraction``.
        """
        if out_size is None:
            shape = (window.height, window.width)
        elif isinstance(out_size, (int, np.integer)):
            shape = (int(out_size), int(out_size))
        else:
            shape = (int(out_size[0]), int(out_size[1]))
        if shape[0] <= 0 or shape[1] <= 0:
            raise RasterError(f"output size must be positive, got {out_size!r}")
        return self._read(window, shape, self.min_valid_fraction)

    def read_overview(self, window: Window | None = None, max_size: int = 512,
                      min_valid_fraction: float = 0.0) -> TileRead:
        """A downsampled read of the whole raster (or a window), longer side at most ``max_size``.

        Keeps the aspect ratio; never upsamples. For whole-layer captions. Skipped only when no
        pixel is valid, unless ``min_valid_fraction`` asks for more.
        """
        window = window or self.full_window
        if max_size <= 0:
            raise RasterError(f"max_size must be positive, got {max_size}")
        scale = min(1.0, max_size / max(window.width, window.height))
        shape = (max(1, round(window.height * scale)), max(1, round(window.width * scale)))
        return self._read(window, shape, min_valid_fraction)

    # -- lifecycle ---------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """JSON-able summary (for logs, job headers and the GeoJSON's ``rsmoe`` member)."""
        return {
            "path": self.path,
            "width": self.width,
            "height": self.height,
            "count": self.count,
            "dtype": self.dtype,
            "bands": list(self.band_indices),
            "crs": self.georef.crs_string,
            "georeferenced": self.georeferenced,
            "ground_resolution_m": self.ground_resolution,
        }

    def close(self) -> None:
        self._ds.close()

    @property
    def closed(self) -> bool:
        return bool(self._ds.closed)

    def __enter__(self) -> RasterSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RasterSource({self.path!r}, {self.width}x{self.height}, bands={self.band_indices}, dtype={self.dtype})"
