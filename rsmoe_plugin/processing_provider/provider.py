"""Processing provider ``rsmoe``: batch tile annotation (``rsmoe:annotatetiles``)."""
from __future__ import annotations

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from rsmoe_plugin.processing_provider.annotate_tiles import AnnotateTilesAlgorithm
from rsmoe_plugin.resources import icon_path

PROVIDER_ID = "rsmoe"


class RSMoEProvider(QgsProcessingProvider):
    """RS-MoE algorithms; outputs are GeoJSON files (what the engine writes)."""

    def id(self) -> str:
        return PROVIDER_ID

    def name(self) -> str:
        return "RS-MoE"

    def longName(self) -> str:
        return "RS-MoE remote-sensing captioning"

    def icon(self) -> QIcon:
        return QIcon(icon_path())

    def loadAlgorithms(self) -> None:
        self.addAlgorithm(AnnotateTilesAlgorithm())

    def supportsNonFileBasedOutput(self) -> bool:
        return False

    def supportedOutputVectorLayerExtensions(self) -> list[str]:
        return ["geojson"]

    def defaultVectorFileExtension(self, hasGeometry: bool = True) -> str:  # noqa: N803 - Qt name
        return "geojson"
