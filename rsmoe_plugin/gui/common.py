"""Helpers shared by the panels: the region the user means, messages, HTML."""
from __future__ import annotations

import html
import traceback

from qgis.core import Qgis

from rsmoe_plugin.client import ModelAnswer
from rsmoe_plugin.engine_manager import EngineStatus, log
from rsmoe_plugin.errors import PluginError
from rsmoe_plugin.regions import REGION_VISIBLE, RegionRequest, region_for_layer

REGION_CHOICES = (("Whole layer", "layer"), ("Visible extent", REGION_VISIBLE))
MESSAGE_SECONDS = 12


def region_from_canvas(iface, mode: str, prepare: bool = True) -> RegionRequest:  # noqa: ANN001 - QgisInterface
    """The active layer, whole or as far as the map canvas shows it (main thread)."""
    layer = iface.activeLayer()
    extent = crs = None
    if mode == REGION_VISIBLE:
        canvas = iface.mapCanvas()
        extent = canvas.extent()
        crs = canvas.mapSettings().destinationCrs()
    return region_for_layer(layer, extent, crs, prepare=prepare)


def error_text(exc: BaseException) -> tuple[str, str]:
    """(title, message) for the message bar."""
    if isinstance(exc, PluginError):
        return exc.title, str(exc)
    log("unexpected error:\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        Qgis.Critical)
    return "RS-MoE: unexpected error", f"{type(exc).__name__}: {exc} (details in the RS-MoE log panel)"


def push_error(iface, exc: BaseException) -> str:  # noqa: ANN001
    title, text = error_text(exc)
    if iface is not None:
        iface.messageBar().pushMessage(title, text, Qgis.Critical, 0)
    log(f"{title}: {text}", Qgis.Warning)
    return text


def push_message(iface, title: str, text: str, level: Qgis.MessageLevel = Qgis.Info,  # noqa: ANN001
                 seconds: int = MESSAGE_SECONDS) -> None:
    if iface is not None:
        iface.messageBar().pushMessage(title, text, level, seconds)


def esc(text: object) -> str:
    return html.escape(str(text)).replace("\n", "<br>")


def uncertainty_html(answer: ModelAnswer) -> str:
    """The visible note of an answer the model is unsure about ('' when it is not, or the engine is older)."""
    note = answer.uncertainty_note()
    if not note:
        return ""
    return (f'<p style="color:#b26a00; background-color:#fff4e0"><b>&#9888; {esc(note)}</b></p>')


def engine_status_html(status: EngineStatus) -> str:
    colour = {"running": "#2e7d32", "connected": "#2e7d32", "starting": "#b26a00"}.get(status.state, "#9e9e9e")
    if status.state in ("died", "failed"):
        colour = "#c62828"
    return f'<span style="color:{colour}">&#9679;</span> {esc(status.summary())}'
