"""Plugins > RS-MoE > Diagnostics: the report of a running engine holds the expected facts and no token."""
from __future__ import annotations

from pathlib import Path

from qgis.PyQt.QtWidgets import QApplication

from tests.qgis.conftest import screenshot_path, wait_task


def test_diagnostics_report_has_the_facts_and_no_token(plugin, engine, qtbot, tmp_path: Path) -> None:  # noqa: ANN001
    health = engine.health()
    token = engine.token
    assert len(token) >= 16  # the running engine's token: it must not appear below
    action = next(a for a in plugin.actions if a.text() == "Diagnostics\u2026")
    action.trigger()
    dialog = plugin.diagnostics_dialog
    wait_task(qtbot, dialog.task, 180)
    report = dialog.report()
    for expected in ("QGIS: 3.", "Plugin: rsmoe_plugin 0.1.0", "Engine settings (environment): mode start",
                     "NVIDIA GPUs (nvidia-smi): no NVIDIA GPU", "Engine Python: ", "Engine packages: ",
                     "rsmoe 0.1.0", "torch 2.13.0", "onnxruntime 1.", "ONNX Runtime providers: ",
                     "CPUExecutionProvider", "torch CUDA: build CPU only, available: no, devices: none",
                     f"Engine version: {health.version}", f"Model: {health.model_id} (variant {health.variant}",
                     f"Backend: {health.backend} on cpu", "GPU used by the engine: no (CPU)",
                     "Engine state: Engine running (started by the plugin)", "Last lines of the engine log"):
        assert expected in report, f"{expected!r} missing from:\n{report}"
    assert token not in report and "Bearer" not in report
    assert dialog.copy_button.isEnabled()
    dialog.copy()
    assert QApplication.clipboard().text() == report
    dialog.save(tmp_path / "report.txt")
    assert (tmp_path / "report.txt").read_text(encoding="utf-8") == report
    dialog.resize(900, 620)
    qtbot.wait(50)
    assert dialog.grab().save(str(screenshot_path("diagnostics.png")))
    dialog.close()
