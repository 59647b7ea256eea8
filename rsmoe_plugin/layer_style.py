"""How an annotation layer shows its captions: map tips, display expression, outlined tiles, form."""
from __future__ import annotations

from qgis.core import QgsFillSymbol, QgsSingleSymbolRenderer, QgsVectorLayer

#: Map tip: the caption, then each expert's part, or the skip reason. OGR reads ``segments`` as a JSON
#: field (a list of maps); ``from_json`` covers drivers that give the JSON text instead.
MAP_TIP_TEMPLATE = (
    '<div style="max-width:420px"><b>Tile [% "tile_index" %]</b><br>'
    '[% coalesce("caption", \'<i>skipped: \' || "skipped" || \'</i>\') %]'
    '[% CASE WHEN "segments" IS NOT NULL THEN \'<hr>\' || array_to_string(array_foreach('
    'coalesce(from_json("segments"), "segments"), '
    "'<b>' || map_get(@element, 'expert') || '</b>: ' || map_get(@element, 'text')), '<br>') ELSE '' END %]"
    "</div>"
)
#: Added after the caption where the layer has the ``uncertain`` field (engines that say when they are unsure).
UNCERTAINTY_TIP = (
    '[% CASE WHEN "uncertain" THEN \'<br><span style="color:#b26a00"><b>Unsure: \' || '
    "array_to_string(coalesce(from_json(\"uncertainty\"), \"uncertainty\"), '; ') || "
    "'; the caption may be wrong.</b></span>' ELSE '' END %]"
)
DISPLAY_EXPRESSION = "coalesce(\"caption\", 'skipped: ' || \"skipped\")"


def map_tip_template(has_uncertainty: bool) -> str:
    """The map tip, with the unsure note for layers that have the ``uncertain`` / ``uncertainty`` fields."""
    if not has_uncertainty:
        return MAP_TIP_TEMPLATE
    head, sep, tail = MAP_TIP_TEMPLATE.partition("[% CASE WHEN \"segments\"")
    return head + UNCERTAINTY_TIP + sep + tail


def style_annotation_layer(layer: QgsVectorLayer) -> None:
    """Outline the tiles (the imagery stays visible) and show captions in map tips and the form."""
    symbol = QgsFillSymbol.createSimple({"color": "255,200,0,25", "outline_color": "255,140,0,255",
                                         "outline_width": "0.5", "outline_width_unit": "MM"})
    layer.setRenderer(QgsSingleSymbolRenderer(symbol))
    fields = layer.fields()
    layer.setMapTipTemplate(map_tip_template(fields.indexFromName("uncertain") >= 0
                                             and fields.indexFromName("uncertainty") >= 0))
    layer.setDisplayExpression(DISPLAY_EXPRESSION)
    index = layer.fields().indexFromName("caption")
    if index >= 0:
        layer.setFieldAlias(index, "Caption")
    layer.triggerRepaint()
