"""From a fresh profile: "Set up the engine" for real (a venv, CPU torch from the machine's package index, the
engine wheel, the base weights), then "Caption this layer" runs on the engine it installed; "Remove" deletes it."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from rsmoe_plugin.engine_env import venv_python
from rsmoe_plugin.engine_setup import LOG_FILE, STATE_FILE, VENV_DIR, read_state
from tests.qgis.conftest import screenshot_path, show_on_canvas, stored_settings, wait_task

#: the set-up's time bound here: creating the venv, installing torch and the engine's stack from the local
#: mirror and the pip cache, provisioning the base weights (about a minute on this 2-core machine)
SETUP_TIMEOUT_S = 420


def _command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_setup_installs_an_engine_that_captions(plugin, engine, qgis_iface, qtbot, s2_layer,  # noqa: ANN001
                                                tmp_path: Path, engine_wheel: Path, monkeypatch) -> None:
    from rsmoe_plugin.gui.setup_dialog import SetupDialog
    from rsmoe_plugin.settings import load_settings

    root = tmp_path / "profiles" / "default" / "rsmoe"
    with stored_settings():
        dialog = SetupDialog(qgis_iface, root=root)
        qtbot.addWidget(dialog)
        wait_task(qtbot, dialog.discovery, 120)
        assert dialog.base_python() and "CPU build" in dialog.gpu_label.text()  # no NVIDIA GPU on this machine
        assert dialog.setup_button.text() == "Set up the engine" and not dialog.remove_button.isEnabled()
        dialog.torch_combo.setCurrentIndex(dialog.torch_combo.findData("cpu"))
        dialog.pytorch_check.setChecked(False)  # torch from the package index this machine reaches (its mirror)
        dialog.export_check.setChecked(False)  # the torch backend: no ONNX export (minutes) in this test
        dialog.wheel_widget.setFilePath(str(engine_wheel))
        dialog.show()
        start = time.monotonic()
        task = dialog.start_setup()
        assert task is not None and not dialog.setup_button.isEnabled() and dialog.cancel_button.isEnabled()
        outcome = wait_task(qtbot, task, SETUP_TIMEOUT_S)
        seconds = time.monotonic() - start
        sys.stderr.write(f"\n[setup] the engine set-up took {seconds:.0f} s\n")
        assert outcome.ok and outcome.result.result.ok, dialog.step_label.text() + "\n" + dialog.log_view.toPlainText()
        python = venv_python(root / VENV_DIR)
        assert load_settings(apply_environment=False).python == str(python)  # the plugin now uses it
        assert dialog.progress.value() == 100 and "is now the plugin" in dialog.step_label.text()
        assert dialog.setup_button.text() == "Upgrade the engine" and dialog.remove_button.isEnabled()
        state = read_state(root / STATE_FILE)
        assert state is not None and state.torch_build == "cpu" and not state.export_onnx
        log = (root / LOG_FILE).read_text()
        assert "== [1/7] Creating the virtual environment" in log and "== done in" in log
        assert "torch: CPU build asked for" in log
        dialog.resize(760, 860)
        qtbot.wait(100)
        assert dialog.grab().save(str(screenshot_path("setup_dialog.png")))

        # "Caption this layer" with the engine the set-up installed (the session's engine variable off)
        monkeypatch.delenv("RSMOE_ENGINE_PYTHON")
        show_on_canvas(qgis_iface, s2_layer)
        plugin.caption_panel.set_region_mode("layer")
        plugin.caption_panel.set_style("concise")
        caption = wait_task(qtbot, plugin.caption_active_layer(), 600)
        assert caption.ok, caption.error
        assert caption.result.text.strip() and caption.result.raw["source"]["path"].endswith("s2_crop512.tif")
        pid = engine.process_id
        assert pid is not None and _command_line(pid)[0] == str(python)
        assert engine.status.health is not None and engine.status.health.backend == "torch"

        # "Remove" deletes the environment and the setting that pointed at it
        assert dialog.remove() is True
        assert not (root / VENV_DIR).exists() and load_settings(apply_environment=False).python == ""
        assert engine.process_id is None
        assert dialog.setup_button.text() == "Set up the engine"
        dialog.close()
