"""Which pixels of a layer go to the engine, and how: a local file by path, anything else rendered.

:func:`region_for_layer` runs in the main thread (it reads the layer and the canvas) and returns a
:class:`RegionRequest`; its :meth:`RegionRequest.body` (which may render) runs in a worker thread.

* A layer whose pixels the engine can read itself (GDAL provider, a file on this machine, CRS as
  in the file, an RGB / grey renderer) is sent as ``path`` (+ ``extent`` in the layer CRS, + the
  renderer's bands), so the engine reads the full-resolution data.
* Any other layer (web / XYZ tiles, virtual rasters, pseudocolour styles...) is drawn by QGIS
  and sent as PNG bytes (``image_base64``), at most :data:`MAX_RENDER_SIZE` pixels on the longer side,
  with the ground resolution of the rendering (``ground_resolution_m``, metres per rendered pixel), which
  the PNG cannot carry: the engine tells the model the resolution it sees.

A request has a :attr:`RegionRequest.key`: the same layer and extent give the same key, and the
body is built once per request object, so follow-up questions send identical data and hit the
engine's visual feature cache.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsMapLayer,
    QgsProject,
    QgsRasterDataProvider,
    QgsRasterLayer,
    QgsRectangle,
)

from rsmoe_plugin.errors import BadLayerError
from rsmoe_plugin.features import ground_resolution_m
from rsmoe_plugin.rendering import png_base64, render_image

#: longer side of a rendered region sent for a caption or a question (the model reads 224 px)
MAX_RENDER_SIZE = 448
REGION_LAYER = "layer"
REGION_VISIBLE = "visible"

_RENDERERS_BY_PATH = {"multibandcolor", "singlebandgray", "paletted"}


def local_raster_path(layer: QgsRasterLayer) -> str | None:
    """The file the engine can open for this layer, or None when QGIS must render it."""
    if layer.providerType() != "gdal":
        return None
    source = layer.dataProvider().dataSourceUri() if layer.dataProvider() else layer.source()
    path = source.split("|", 1)[0]
    if not path or not os.path.isfile(path):
        return None
    provider_crs = layer.dataProvider().crs()
    if provider_crs.isValid() and layer.crs() != provider_crs:
        return None  # the user assigned another CRS: extents would not match the file's
    if not layer.crs().isValid():
        return None
    return str(Path(path).resolve())


def renderer_bands(layer: QgsRasterLayer) -> list[int] | None | bool:
    """The bands the layer's renderer shows (RGB or grey), None for the engine's default, False: render."""
    renderer = layer.renderer()
    kind = renderer.type() if renderer is not None else ""
    if kind not in _RENDERERS_BY_PATH:
        return False
    if kind == "multibandcolor":
        bands = [renderer.redBand(), renderer.greenBand(), renderer.blueBand()]
        if any(b <= 0 for b in bands):
            return False
        return None if bands == [1, 2, 3] and layer.bandCount() == 3 else bands
    if kind == "singlebandgray":
        return [renderer.grayBand()]
    return None  # paletted: the engine expands the colour table of band 1


def _coord(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4f}".rstrip("0").rstrip(".")


def _round_extent(extent: QgsRectangle | None, digits: int = 9) -> tuple[float, ...] | None:
    if extent is None:
        return None
    return tuple(float(f"{v:.{digits}g}") for v in
                 (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()))


def render_size(layer: QgsRasterLayer, extent: QgsRectangle, max_size: int = MAX_RENDER_SIZE) -> tuple[int, int]:
    """Pixels to render ``extent`` at: longer side ``max_size``, never finer than the layer's own pixels."""
    ratio = extent.width() / extent.height() if extent.height() > 0 else 1.0
    longer = max_size
    provider = layer.dataProvider()
    if provider is not None and provider.capabilities() & QgsRasterDataProvider.Size and layer.width() > 0:
        native = max(extent.width() / layer.rasterUnitsPerPixelX(), extent.height() / layer.rasterUnitsPerPixelY())
        longer = max(16, min(max_size, int(math.ceil(native))))
    if ratio >= 1:
        return longer, max(1, round(longer / ratio))
    return max(1, round(longer * ratio)), longer


@dataclass
class RegionRequest:
    """A region of a layer, ready to become a request body (see the module docstring)."""

    layer_id: str
    layer_name: str
    layer_source: str
    crs: QgsCoordinateReferenceSystem
    extent: QgsRectangle | None
    path: str | None = None
    bands: list[int] | None = None
    render_layer: QgsRasterLayer | None = None
    render_extent: QgsRectangle | None = None
    render_width: int = 0
    render_height: int = 0
    ground_resolution_m: float | None = None  # metres per rendered pixel (rendered regions only)
    _body: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def rendered(self) -> bool:
        return self.path is None

    @property
    def key(self) -> tuple:
        """Same layer + same extent -> same key (and the same request body)."""
        return (self.layer_id, self.layer_source, _round_extent(self.extent), tuple(self.bands or ()))

    def describe(self, with_name: bool = True) -> str:
        """e.g. ``Layer: extent 439498, 4172500 : 443502, 4175500 (EPSG:32618), read from the file``."""
        if self.extent is None:
            where = "whole layer"
        else:
            e = self.extent
            where = (f"extent {_coord(e.xMinimum())}, {_coord(e.yMinimum())} : {_coord(e.xMaximum())}, "
                     f"{_coord(e.yMaximum())} ({self.crs.authid() or 'layer CRS'})")
        how = (f"rendered by QGIS ({self.render_width} x {self.render_height} px)" if self.rendered
               else "read from the file")
        return f"{self.layer_name}: {where}, {how}" if with_name else f"{where}, {how}"

    def body(self) -> dict[str, Any]:
        """The region part of a ``/caption`` or ``/ask`` request (renders once; may run in a worker)."""
        if self._body is None:
            if self.path is not None:
                body: dict[str, Any] = {"path": self.path}
                if self.extent is not None:
                    body["extent"] = [self.extent.xMinimum(), self.extent.yMinimum(),
                                      self.extent.xMaximum(), self.extent.yMaximum()]
                if self.bands:
                    body["bands"] = list(self.bands)
            else:
                assert self.render_layer is not None and self.render_extent is not None
                image = render_image(self.render_layer, self.render_extent, self.crs, self.render_width,
                                     self.render_height)
                body = {"image_base64": png_base64(image)}
                if self.ground_resolution_m is not None:
                    body["ground_resolution_m"] = self.ground_resolution_m
            self._body = body
        return dict(self._body)


def raster_layer_or_error(layer: QgsMapLayer | None) -> QgsRasterLayer:
    """The layer if it is a valid raster layer, else a :class:`BadLayerError` that says what to do."""
    if layer is None:
        raise BadLayerError("no layer is selected: select a raster layer in the Layers panel")
    if not isinstance(layer, QgsRasterLayer):
        raise BadLayerError(f"'{layer.name()}' is not a raster layer: select a raster (imagery) layer")
    if not layer.isValid():
        raise BadLayerError(f"raster layer '{layer.name()}' is not valid (its data source cannot be read)")
    return layer


def layer_extent_of(layer: QgsRasterLayer, extent: QgsRectangle | None,
                    extent_crs: QgsCoordinateReferenceSystem | None) -> QgsRectangle | None:
    """``extent`` (in ``extent_crs``) in the layer CRS, clipped to the layer; None for the whole layer."""
    if extent is None or extent.isNull() or extent.isEmpty():
        return None
    if extent_crs is not None and extent_crs.isValid() and extent_crs != layer.crs():
        transform = QgsCoordinateTransform(extent_crs, layer.crs(), QgsProject.instance())
        try:
            extent = transform.transformBoundingBox(extent)
        except Exception as exc:  # QgsCsException
            raise BadLayerError(f"the extent cannot be expressed in the CRS of '{layer.name()}': {exc}") from None
    full = layer.extent()
    clipped = extent.intersect(full)
    if clipped.isEmpty() or clipped.width() <= 0 or clipped.height() <= 0:
        raise BadLayerError(f"the chosen extent does not overlap layer '{layer.name()}': zoom to the layer or "
                            f"use the whole layer")
    tol_x, tol_y = layer.rasterUnitsPerPixelX() * 0.5, layer.rasterUnitsPerPixelY() * 0.5
    if (abs(clipped.xMinimum() - full.xMinimum()) <= tol_x and abs(clipped.xMaximum() - full.xMaximum()) <= tol_x
            and abs(clipped.yMinimum() - full.yMinimum()) <= tol_y
            and abs(clipped.yMaximum() - full.yMaximum()) <= tol_y):
        return None  # the extent covers the whole layer: same request (and cache key) as the whole layer
    return clipped


def region_for_layer(layer: QgsMapLayer | None, extent: QgsRectangle | None = None,
                     extent_crs: QgsCoordinateReferenceSystem | None = None,
                     max_size: int = MAX_RENDER_SIZE, prepare: bool = True) -> RegionRequest:
    """Prepare a region of ``layer`` (main thread): whole layer, or ``extent`` given in ``extent_crs``.

    ``prepare=False`` skips cloning the layer for rendering (enough for :attr:`RegionRequest.key`).
    """
    raster = raster_layer_or_error(layer)
    clipped = layer_extent_of(raster, extent, extent_crs)
    path = local_raster_path(raster)
    bands = renderer_bands(raster) if path is not None else False
    request = RegionRequest(layer_id=raster.id(), layer_name=raster.name(), layer_source=raster.source(),
                            crs=raster.crs(), extent=clipped)
    if path is not None and bands is not False:
        request.path = path
        request.bands = bands or None
        return request
    render_extent = clipped if clipped is not None else raster.extent()
    if render_extent.isEmpty():
        raise BadLayerError(f"layer '{raster.name()}' has an empty extent")
    request.render_layer = raster.clone() if prepare else None
    request.render_extent = QgsRectangle(render_extent)
    request.render_width, request.render_height = render_size(raster, render_extent, max_size)
    units_per_pixel = (render_extent.width() / request.render_width
                       + render_extent.height() / request.render_height) / 2
    request.ground_resolution_m = ground_resolution_m(render_extent, raster.crs(), units_per_pixel)
    return request
