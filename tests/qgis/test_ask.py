""""Ask a question": the dock, its history per layer and extent, and the engine's feature cache."""
from __future__ import annotations

from qgis.core import Qgis, QgsCoordinateReferenceSystem, QgsRectangle

from tests.qgis.conftest import s2_mercator_extent, screenshot_path, show_on_canvas, stub_engine, wait_task


def test_follow_up_questions_reuse_the_feature_cache(plugin, qgis_iface, qtbot, s2_layer) -> None:  # noqa: ANN001
    visible = QgsRectangle(440000, 4172500, 443000, 4175500)  # EPSG:32618, inside the 512 x 512 crop
    show_on_canvas(qgis_iface, s2_layer, visible)
    dock = plugin.ask_dock
    dock.show()
    dock.set_region_mode("visible")
    dock.refresh()
    assert "No questions yet" in dock.history_view.toPlainText()
    qgis_iface.messageBar().clear_messages()

    dock.question_edit.setText("Is this area rural or urban?")
    first = wait_task(qtbot, dock.ask())
    assert first.ok, first.error
    second = wait_task(qtbot, dock.ask("Are there any rivers?"))
    assert second.ok, second.error
    a1, a2 = first.result, second.result
    assert a1.text.strip() and a2.text.strip()
    assert a1.window == a2.window and a1.window != [0, 0, 512, 512]  # the visible part only
    assert a2.cached, "the follow-up question should reuse the engine's cached visual features"
    history = dock.current_history()
    assert [e.question for e in history] == ["Is this area rural or urban?", "Are there any rivers?"]
    text = dock.history_view.toPlainText()
    assert "Is this area rural or urban?" in text and "Are there any rivers?" in text and "features from cache" in text
    assert a1.router == "answer_head" and "answered by the answer head" in text  # closed: no expert decoded
    assert len(qgis_iface.messageBar().get_messages(Qgis.Success)) == 2
    dock.resize(520, 620)
    qtbot.wait(50)
    assert dock.grab().save(str(screenshot_path("ask_dock.png")))

    dock.set_region_mode("layer")  # another region of the same layer: its own (empty) history
    assert dock.current_history() == []
    dock.set_region_mode("visible")
    assert len(dock.current_history()) == 2, (list(dock.histories), dock._current_key)


def test_questions_about_a_rendered_xyz_layer(plugin, qgis_iface, qtbot, xyz_layer) -> None:  # noqa: ANN001
    show_on_canvas(qgis_iface, xyz_layer, s2_mercator_extent(0.6), QgsCoordinateReferenceSystem("EPSG:3857"))
    dock = plugin.ask_dock
    dock.set_region_mode("visible")
    dock.refresh()
    assert "XYZ Sentinel-2 tiles" in dock.layer_label.text()
    first = wait_task(qtbot, dock.ask("What is the main land cover?"))
    # an open question again (the experts, on the whole rendering); closed ones on a coarse view are answered on
    # tiles (test_follow_up_questions_reuse_the_feature_cache)
    second = wait_task(qtbot, dock.ask("What is next to the water?"))
    assert first.ok and second.ok, (first.error, second.error)
    assert first.result.raw["source"]["path"] is None  # rendered by QGIS
    assert second.result.cached  # identical rendered bytes -> same cache key in the engine
    assert first.result.ground_resolution_m and first.result.model_resolution_m  # sent with the PNG, seen
    for exchange in dock.current_history()[-2:]:  # a note under every answer the model is unsure of
        assert ("Unsure:" in exchange.html()) == exchange.answer.uncertain


def test_an_unsure_answer_shows_a_note_and_an_older_engine_none(qgis_iface) -> None:  # noqa: ANN001
    from rsmoe_plugin.client import ModelAnswer
    from rsmoe_plugin.gui.ask_dock import Exchange

    raw = {"text": "two", "task": "ask", "segments": [{"expert": "objects", "text": "two"}], "cached": False,
           "seconds": 0.5}
    unsure = Exchange("How many ships?", ModelAnswer.from_json(
        {**raw, "uncertain": True, "uncertainty": ["resolution 0.05 m/px is finer than the trained range 0.3-12 m/px"]}))
    assert "Unsure: resolution 0.05 m/px is finer than the trained range 0.3-12 m/px; the answer may be wrong." in (
        unsure.html())
    assert "Unsure" not in Exchange("How many ships?", ModelAnswer.from_json(raw)).html()  # older engine: no field


def test_an_older_engine_gets_requests_it_understands() -> None:
    """An engine from before ground resolutions refuses the unknown field (422): the client sends the request
    again without it, and reads the answer (no uncertainty fields) as not unsure."""
    from rsmoe_plugin.client import EngineClient

    bodies: list[dict] = []

    def old_engine(path: str, body: dict) -> tuple[int, dict]:
        bodies.append(body)
        if "ground_resolution_m" in body:
            return 422, {"error": "invalid request: unknown field 'ground_resolution_m'"}
        return 200, {"text": "A river.", "task": "caption", "segments": [], "cached": False, "seconds": 0.1,
                     "scene": None, "scene_confidence": None}

    with stub_engine(old_engine) as url:
        answer = EngineClient(url, "token").caption({"image_base64": "AAAA", "ground_resolution_m": 0.5})
        assert answer.text == "A river." and answer.uncertain is False and answer.uncertainty == []
        assert answer.model_resolution_m is None and answer.uncertainty_note() is None
        assert ["ground_resolution_m" in b for b in bodies] == [True, False]
