"""The engine dying mid-request, and a refused token: clear messages in QGIS, then it works again."""
from __future__ import annotations

import os
import signal

import pytest
from qgis.core import Qgis

from tests.qgis.conftest import show_on_canvas, wait_task


def test_engine_death_mid_request_is_reported_and_the_next_request_restarts_it(  # noqa: ANN001
        plugin, engine, qgis_iface, qtbot, s2_layer, monkeypatch) -> None:
    from rsmoe_plugin.errors import EngineDiedError

    show_on_canvas(qgis_iface, s2_layer)
    engine.health()
    pid = engine.process_id
    assert pid is not None
    starts = engine.starts
    panel = plugin.caption_panel
    panel.set_region_mode("layer")
    panel.set_style("detailed")
    qgis_iface.messageBar().clear_messages()
    healthy = engine.ensure

    def healthy_then_frozen():  # the engine freezes once its health is checked, so the caption request stays
        client = healthy()      # in flight however fast the model is
        os.kill(pid, signal.SIGSTOP)
        return client

    monkeypatch.setattr(engine, "ensure", healthy_then_frozen)
    task = plugin.caption_active_layer()
    qtbot.wait(1500)  # the request is in flight now
    assert task.outcome is None
    os.kill(pid, signal.SIGKILL)
    monkeypatch.undo()
    outcome = wait_task(qtbot, task, 120)
    assert isinstance(outcome.error, EngineDiedError), outcome.error
    critical = qgis_iface.messageBar().get_messages(Qgis.Critical)
    assert any("stopped while working on the caption" in m and "SIGKILL" in m and "restarted with the next request"
               in m for m in critical), critical
    assert "Failed" in panel.status_label.text() and "stopped while working" in panel.status_label.text()
    assert engine.status.state == "died"
    assert "Engine died" in panel.engine_label.text()

    panel.set_style("concise")
    retry = wait_task(qtbot, plugin.caption_active_layer())
    assert retry.ok, retry.error
    assert retry.result.text.strip()
    assert engine.starts == starts + 1 and engine.process_id not in (None, pid)
    assert "Engine running" in panel.engine_label.text()


def test_a_refused_token_says_so(engine) -> None:  # noqa: ANN001
    from rsmoe_plugin.client import EngineClient
    from rsmoe_plugin.engine_manager import EngineManager
    from rsmoe_plugin.errors import TokenRefusedError
    from rsmoe_plugin.settings import EngineSettings

    url = engine.ensure().url
    with pytest.raises(TokenRefusedError, match="refused the token.*wrong token"):
        EngineClient(url, "not-the-token").health()
    manager = EngineManager(lambda: EngineSettings(mode="connect", url=url, token="not-the-token"))
    with pytest.raises(TokenRefusedError, match="RSMOE_ENGINE_TOKEN"):
        manager.health()
