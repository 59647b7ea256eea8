"""RS-MoE for QGIS: caption, question and annotate raster layers with a local vision-language model.

The plugin runs in QGIS's own Python and imports no torch: the model runs in the RS-MoE engine, a
separate process (``rsmoe serve``) that the plugin starts on demand or connects to over HTTP.
"""
from __future__ import annotations


def classFactory(iface):  # noqa: N802, ANN001, ANN201 - QGIS plugin entry point
    from rsmoe_plugin.plugin import RSMoEPlugin

    return RSMoEPlugin(iface)
