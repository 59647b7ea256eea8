"""``rsmoe:annotatetiles``: caption every tile of a raster layer into a GeoJSON layer of footprints."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputNumber,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorDestination,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QIcon

from rsmoe_plugin.annotation import STYLES, AnnotateParameters, annotate_file, annotate_rendered
from rsmoe_plugin.engine_manager import get_manager
from rsmoe_plugin.errors import PluginError
from rsmoe_plugin.layer_style import style_annotation_layer
from rsmoe_plugin.regions import local_raster_path, renderer_bands
from rsmoe_plugin.resources import icon_path

MIN_TILE_PX = 16

HELP = "\n".join([  # one paragraph per line: QGIS shows each line break
    "Cuts a raster layer into tiles, captions every tile with the local RS-MoE model and writes a GeoJSON layer of "
    "tile footprints (EPSG:4326) whose features carry the captions (with each expert's part), shown as map tips.",
    "<b>Raster layer</b>: any raster layer. Local files the engine can read are tiled and read by the engine at "
    "full resolution; other layers (web / XYZ tiles, virtual rasters) are drawn by QGIS tile by tile, at the "
    "layer's own resolution unless <i>Resolution</i> (advanced) is set.",
    "<b>Extent</b>: only this part of the layer (default: all of it). <b>Tile size</b> and <b>Overlap</b> are in "
    "pixels. Tile size 0 (the default) lets the model choose: tiles of the ground size it was trained on where it "
    "knows one and the layer is fine enough for it (very fine imagery is then read in footprints the model "
    "knows), else 512 pixels. A tile size the model would see outside its trained ground resolution range is "
    "used as given, with a warning naming a size that would be in range; such tiles' captions are marked "
    "uncertain (the <i>uncertain</i> and <i>uncertainty</i> fields).",
    "Cancelling stops the engine after its current batch of tiles; nothing is written then.",
    "The engine is the one set in Plugins > RS-MoE > Engine settings, or in the environment: RSMOE_ENGINE_PYTHON, "
    "or RSMOE_ENGINE_URL and RSMOE_ENGINE_TOKEN.",
])


class CaptionLayerPostProcessor(QgsProcessingLayerPostProcessorInterface):
    """Styles the loaded output layer so its features show their captions."""

    _instance: CaptionLayerPostProcessor | None = None

    def postProcessLayer(self, layer: Any, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> None:  # noqa: N802
        if isinstance(layer, QgsVectorLayer):
            style_annotation_layer(layer)

    @classmethod
    def create(cls) -> CaptionLayerPostProcessor:
        # Processing does not take ownership: keep one Python reference alive
        cls._instance = cls()
        return cls._instance


class AnnotateTilesAlgorithm(QgsProcessingAlgorithm):
    INPUT = "INPUT"
    EXTENT = "EXTENT"
    TILE_SIZE = "TILE_SIZE"
    OVERLAP = "OVERLAP"
    STYLE = "STYLE"
    RESOLUTION = "RESOLUTION"
    OUTPUT = "OUTPUT"

    def __init__(self) -> None:
        super().__init__()
        self._layer: QgsRasterLayer | None = None
        self._path: str | None = None
        self._bands: list[int] | None = None
        self._crs = QgsCoordinateReferenceSystem()
        self._extent: QgsRectangle | None = None
        self._layer_name = ""
        self._source = ""

    # -- identity ----------------------------------------------------------------------------
    def name(self) -> str:
        return "annotatetiles"

    def displayName(self) -> str:  # noqa: N802
        return "Annotate raster tiles with captions"

    def shortHelpString(self) -> str:  # noqa: N802
        return HELP

    def tags(self) -> list[str]:
        return ["caption", "annotate", "tiles", "vision", "language", "remote sensing", "rs-moe", "geojson"]

    def icon(self) -> QIcon:
        return QIcon(icon_path())

    def createInstance(self) -> AnnotateTilesAlgorithm:  # noqa: N802
        return AnnotateTilesAlgorithm()

    # -- parameters --------------------------------------------------------------------------
    def initAlgorithm(self, config: dict[str, Any] | None = None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Raster layer"))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Extent (default: the whole layer)",
                                                       optional=True))
        self.addParameter(QgsProcessingParameterNumber(self.TILE_SIZE, "Tile size (pixels; 0 = the model's default)",
                                                       QgsProcessingParameterNumber.Integer, 0, False, 0, 8192))
        self.addParameter(QgsProcessingParameterNumber(self.OVERLAP, "Overlap (pixels)",
                                                       QgsProcessingParameterNumber.Integer, 0, False, 0, 8191))
        style = QgsProcessingParameterEnum(self.STYLE, "Caption style", options=list(STYLES), defaultValue=0)
        style.setFlags(style.flags() | QgsProcessingParameterEnum.FlagAdvanced)
        self.addParameter(style)
        resolution = QgsProcessingParameterNumber(
            self.RESOLUTION, "Resolution for rendered layers (map units per pixel; 0 = the layer's own)",
            QgsProcessingParameterNumber.Double, 0.0, True, 0.0)
        resolution.setFlags(resolution.flags() | QgsProcessingParameterNumber.FlagAdvanced)
        self.addParameter(resolution)
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.OUTPUT, "Tile captions (GeoJSON)", QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber("TILES", "Tiles"))
        self.addOutput(QgsProcessingOutputNumber("CAPTIONED", "Captioned tiles"))
        self.addOutput(QgsProcessingOutputNumber("SKIPPED", "Skipped tiles (too little data)"))

    # -- running -----------------------------------------------------------------------------
    def prepareAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> bool:
        """Main thread: read the layer, decide file vs rendering, clone the layer for rendering."""
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException("the input is not a valid raster layer")
        self._layer_name = layer.name()
        self._source = layer.source()
        self._crs = QgsCoordinateReferenceSystem(layer.crs())
        extent = None
        if parameters.get(self.EXTENT) not in (None, ""):
            rect = self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs())
            if not rect.isNull() and not rect.isEmpty():
                extent = rect.intersect(layer.extent())
                if extent.isEmpty():
                    raise QgsProcessingException(f"the extent does not overlap layer '{layer.name()}'")
        self._extent = extent
        path = local_raster_path(layer)
        bands = renderer_bands(layer) if path is not None else False
        if path is not None and bands is not False:
            self._path, self._bands, self._layer = path, (bands or None), None
        else:
            self._path, self._bands, self._layer = None, None, layer.clone()
        return True

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        out = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        if not out or out.startswith("memory:"):
            raise QgsProcessingException("the output must be a GeoJSON file")
        if Path(out).suffix.lower() not in (".geojson", ".json"):
            raise QgsProcessingException(f"the output '{out}' must be a .geojson file")
        out = os.path.abspath(out)
        tile_size = self.parameterAsInt(parameters, self.TILE_SIZE, context)
        if 0 < tile_size < MIN_TILE_PX:
            raise QgsProcessingException(f"the tile size must be 0 (the model's default) or at least {MIN_TILE_PX} "
                                         f"pixels, got {tile_size}")
        try:
            params = AnnotateParameters(
                tile_size=tile_size,
                overlap=self.parameterAsInt(parameters, self.OVERLAP, context),
                style=STYLES[self.parameterAsEnum(parameters, self.STYLE, context)],
                resolution=self.parameterAsDouble(parameters, self.RESOLUTION, context) or 0.0)
            manager = get_manager()
            if self._path is not None:
                outcome = annotate_file(manager, self._path, out, params, self._extent, self._bands, feedback)
            else:
                assert self._layer is not None
                extent = self._extent if self._extent is not None else self._layer.extent()
                outcome = annotate_rendered(manager, self._layer, self._crs, extent, out, params, feedback,
                                            source_label=self._source)
        except PluginError as exc:
            raise QgsProcessingException(f"{exc.title}: {exc}") from None
        finally:
            if QgsApplication.platform() == "qgis_process":
                # one algorithm per qgis_process run, and it exits without unloading plugins or running
                # Python's atexit: stop an engine started for this run now
                get_manager().stop()
        feedback.pushInfo(outcome.summary())
        if context.willLoadLayerOnCompletion(out):
            details = context.layerToLoadOnCompletionDetails(out)
            details.name = f"{self._layer_name} captions"
            details.setPostProcessor(CaptionLayerPostProcessor.create())
        return {self.OUTPUT: out, "TILES": outcome.total, "CAPTIONED": outcome.captioned, "SKIPPED": outcome.skipped}

