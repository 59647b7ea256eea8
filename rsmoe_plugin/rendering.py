"""Render a layer (any layer QGIS can draw: web / XYZ tiles, virtual rasters, styled rasters) to PNG.

Rendering uses :class:`QgsMapRendererCustomPainterJob` on a QImage and waits for it, so it may run in
a worker thread (QgsTask, Processing) on a layer *clone* made in the main thread, the way QGIS's own
"Convert map to raster" algorithm does. The background is transparent: pixels without data keep
alpha 0, which the engine reads as nodata and :func:`valid_fraction` counts.
"""
from __future__ import annotations

import base64

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsMapLayer,
    QgsMapRendererCustomPainterJob,
    QgsMapSettings,
    QgsRectangle,
)
from qgis.PyQt.QtCore import QBuffer, QByteArray, QIODevice, QSize, Qt
from qgis.PyQt.QtGui import QColor, QImage, QPainter

from rsmoe_plugin.errors import BadLayerError


def render_image(layer: QgsMapLayer, extent: QgsRectangle, crs: QgsCoordinateReferenceSystem,
                 width: int, height: int) -> QImage:
    """Draw ``extent`` (in ``crs``) of ``layer`` into a ``width`` x ``height`` ARGB image."""
    if width < 1 or height < 1:
        raise BadLayerError(f"cannot render an image of {width} x {height} pixels")
    settings = QgsMapSettings()
    settings.setLayers([layer])
    settings.setDestinationCrs(crs)
    settings.setOutputSize(QSize(int(width), int(height)))
    settings.setExtent(extent)
    settings.setBackgroundColor(QColor(0, 0, 0, 0))
    settings.setOutputDpi(96)
    settings.setFlag(QgsMapSettings.Antialiasing, True)
    settings.setFlag(QgsMapSettings.DrawLabeling, False)
    image = QImage(int(width), int(height), QImage.Format_ARGB32)
    image.fill(Qt.transparent)
    painter = QPainter(image)
    try:
        job = QgsMapRendererCustomPainterJob(settings, painter)
        job.start()
        job.waitForFinished()
    finally:
        painter.end()
    errors = [f"{e.layerID}: {e.message}" for e in job.errors()]
    if errors:
        raise BadLayerError(f"QGIS could not draw layer '{layer.name()}': {'; '.join(errors)}")
    return image


def png_bytes(image: QImage) -> bytes:
    """The image as PNG bytes."""
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.WriteOnly)
    if not image.save(buffer, "PNG"):
        raise BadLayerError("could not encode the rendered image as PNG")
    buffer.close()
    return bytes(data)


def png_base64(image: QImage) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def valid_fraction(image: QImage) -> float:
    """Share of pixels with any opacity (drawn data) in an ARGB image."""
    import numpy as np  # QGIS ships numpy

    img = image.convertToFormat(QImage.Format_ARGB32)
    width, height = img.width(), img.height()
    if width == 0 or height == 0:
        return 0.0
    ptr = img.constBits()
    ptr.setsize(img.bytesPerLine() * height)
    rows = np.frombuffer(ptr, dtype=np.uint32).reshape(height, img.bytesPerLine() // 4)[:, :width]
    alpha = rows >> 24
    return float(np.count_nonzero(alpha) / alpha.size)
