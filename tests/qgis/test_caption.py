""""Caption this layer" end to end: the plugin's action -> QgsTask -> the real engine -> panel + message bar."""
from __future__ import annotations

import pytest
from qgis.core import Qgis, QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsProject, QgsRectangle

from rsmoe_plugin.client import ModelAnswer
from rsmoe_plugin.gui.common import region_from_canvas
from tests.qgis.conftest import s2_mercator_extent, screenshot_path, show_on_canvas, wait_task

MERCATOR = QgsCoordinateReferenceSystem("EPSG:3857")


def _successes(iface) -> list[str]:  # noqa: ANN001
    return iface.messageBar().get_messages(Qgis.Success)


def test_caption_local_file_whole_layer_detailed(plugin, qgis_iface, qtbot, s2_layer) -> None:  # noqa: ANN001
    show_on_canvas(qgis_iface, s2_layer)
    qgis_iface.messageBar().clear_messages()
    panel = plugin.caption_panel
    panel.set_region_mode("layer")
    panel.set_style("detailed")
    task = plugin.caption_active_layer()
    assert task is not None
    assert not panel.caption_button.isEnabled()  # busy while the task runs; QGIS is not blocked
    outcome = wait_task(qtbot, task)
    assert outcome.ok, outcome.error
    answer = outcome.result
    assert answer.text.strip()
    assert [s.expert for s in answer.segments] == ["theme", "objects", "relations"]
    assert answer.raw["source"]["path"].endswith("s2_crop512.tif")  # read by the engine from the file
    assert answer.window == [0, 0, 512, 512]
    html = panel.result_view.toPlainText()
    assert answer.text[:40] in html
    for expert in ("theme", "objects", "relations"):
        assert expert in html
    assert answer.scene and 0 < answer.scene_confidence <= 1  # detailed captions always name the head's scene
    assert f"scene: {answer.scene} ({answer.scene_confidence:.2f})" in html
    # honest uncertainty: the engine says whether the model is unsure (the lite model's scene head is, on this
    # 512 px crop seen at 22.9 m/px: 0.32 < its 0.8 gate) and the panel shows it as a visible note
    assert isinstance(answer.raw["uncertain"], bool) and answer.uncertain == bool(answer.uncertainty)
    assert 9.9 < answer.ground_resolution_m < 10.1 and answer.model_resolution_m == pytest.approx(
        answer.ground_resolution_m * 512 / 224, rel=2e-3)
    note = f"Unsure: {'; '.join(answer.uncertainty)}; the caption may be wrong."
    assert (note in html) == answer.uncertain and ("Unsure" in html) == answer.uncertain
    if answer.uncertain:
        assert note in panel.status_label.text() and any(note in m for m in _successes(qgis_iface))
    assert "Engine running" in panel.engine_label.text() and "no GPU" in panel.engine_label.text()
    assert any(answer.text[:40] in m for m in _successes(qgis_iface))
    panel.resize(560, 640)
    panel.show()
    qtbot.wait(50)
    assert panel.grab().save(str(screenshot_path("caption_panel.png")))

    # the same answer as an unsure one, and as an older engine sends it (no uncertainty fields: not unsure)
    region = region_from_canvas(qgis_iface, "layer", prepare=False)
    unsure = ModelAnswer.from_json({**answer.raw, "uncertain": True, "uncertainty": ["scene unsure (0.41)"]})
    panel.show_caption(region, unsure)
    assert "Unsure: scene unsure (0.41); the caption may be wrong." in panel.result_view.toPlainText()
    assert "Unsure: scene unsure (0.41)" in panel.status_label.text()
    older = ModelAnswer.from_json({k: v for k, v in answer.raw.items()
                                   if k not in ("uncertain", "uncertainty", "model_resolution_m")})
    assert older.uncertain is False and older.uncertainty == [] and older.model_resolution_m is None
    panel.show_caption(region, older)
    assert "Unsure" not in panel.result_view.toPlainText() and "Unsure" not in panel.status_label.text()


def test_caption_xyz_layer_visible_extent_is_rendered(plugin, qgis_iface, qtbot, xyz_layer) -> None:  # noqa: ANN001
    show_on_canvas(qgis_iface, xyz_layer, s2_mercator_extent(0.5), MERCATOR)
    qgis_iface.messageBar().clear_messages()
    panel = plugin.caption_panel
    panel.set_region_mode("visible")
    panel.set_style("concise")
    task = plugin.caption_active_layer()
    outcome = wait_task(qtbot, task)
    assert outcome.ok, outcome.error
    answer = outcome.result
    assert answer.text.strip()
    assert answer.raw["source"]["path"] is None  # sent as PNG bytes rendered by QGIS
    width, height = answer.raw["source"]["width"], answer.raw["source"]["height"]
    assert max(width, height) <= 448 and min(width, height) > 100
    # the PNG carries no georeferencing: the plugin sends the metres per rendered pixel, the engine tells the
    # model what it sees (the crop's 10 m pixels, drawn from the zoom-14 tiles at 37.7 N: about 7.6 m)
    assert 5 < answer.ground_resolution_m < 12
    assert answer.model_resolution_m == pytest.approx(answer.ground_resolution_m * max(width, height) / 224,
                                                      rel=2e-3)
    assert "rendered by QGIS" in panel.result_view.toPlainText()
    assert any(answer.text[:40] in m for m in _successes(qgis_iface))


def test_caption_epsg4326_layer_visible_extent_from_a_mercator_canvas(plugin, qgis_iface, qtbot,  # noqa: ANN001
                                                                      world_layer) -> None:
    europe = QgsRectangle(-1_500_000, 4_000_000, 3_000_000, 8_000_000)  # EPSG:3857
    show_on_canvas(qgis_iface, world_layer, europe, MERCATOR)
    panel = plugin.caption_panel
    panel.set_region_mode("visible")
    panel.set_style("concise")
    outcome = wait_task(qtbot, plugin.caption_active_layer())
    assert outcome.ok, outcome.error
    answer = outcome.result
    assert answer.raw["source"]["crs"] == "EPSG:4326" and answer.raw["source"]["path"].endswith("world_rgb_4326.tif")
    # the canvas extent (widened to the canvas's shape) in EPSG:4326, on the layer's 0.703125 degree grid
    seen = QgsCoordinateTransform(MERCATOR, world_layer.crs(), QgsProject.instance()).transformBoundingBox(
        qgis_iface.mapCanvas().extent())
    res = world_layer.rasterUnitsPerPixelX()
    expected = [(seen.xMinimum() + 180) / res, (90 - seen.yMaximum()) / res, seen.width() / res, seen.height() / res]
    assert all(abs(a - b) <= 2.0 for a, b in zip(answer.window, expected, strict=True)), (answer.window, expected)
    assert answer.window[2] < 400 and answer.window[3] < 100  # a part of the world, not all of it
