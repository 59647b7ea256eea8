"""The packaged plugin loads in the desktop QGIS (under Xvfb) from a profile, like a user's install."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.qgis.conftest import install_zip_into_profile, screenshot_path

STARTUP = r'''
import json
import traceback

from qgis.PyQt.QtCore import QTimer
from qgis.PyQt.QtWidgets import QApplication

MARKER = {marker!r}
SHOT = {shot!r}


def check():
    result = {{}}
    try:
        import qgis.utils
        from qgis.core import QgsApplication
        from qgis.utils import iface

        registry = QgsApplication.processingRegistry()
        result["active"] = "rsmoe_plugin" in qgis.utils.active_plugins
        result["provider"] = registry.providerById("rsmoe") is not None
        result["algorithm"] = registry.algorithmById("rsmoe:annotatetiles") is not None
        plugin = qgis.utils.plugins["rsmoe_plugin"]
        result["actions"] = [a.text() for a in plugin.actions]
        result["menu"] = [a.text() for a in iface.pluginMenu().actions()]
        result["plugin_file"] = __import__("rsmoe_plugin").__file__
        plugin.caption_panel.show()
        plugin.ask_dock.show()
        QApplication.processEvents()
        result["screenshot"] = iface.mainWindow().grab().save(SHOT)
    except Exception:
        result["error"] = traceback.format_exc()
    with open(MARKER, "w") as fh:
        json.dump(result, fh)
    QApplication.instance().quit()


QTimer.singleShot(2000, check)
'''


def test_plugin_zip_loads_in_desktop_qgis(tmp_path: Path) -> None:
    xvfb_run, qgis = shutil.which("xvfb-run"), shutil.which("qgis")
    if not xvfb_run or not qgis:
        pytest.skip("the desktop QGIS (qgis) or xvfb-run is not installed")
    root = tmp_path / "qgis"
    profile = install_zip_into_profile(root)
    marker = tmp_path / "marker.json"
    shot = screenshot_path("desktop_qgis.png")
    shot.unlink(missing_ok=True)
    startup = tmp_path / "startup.py"
    startup.write_text(STARTUP.format(marker=str(marker), shot=str(shot)), encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RSMOE_ENGINE_", "QGIS_CUSTOM_CONFIG_PATH", "QGIS_OPTIONS_PATH", "QT_QPA_"))}
    cmd = [xvfb_run, "-a", "-s", "-screen 0 1400x900x24", qgis, "--profiles-path", str(root), "--nologo",
           "--noversioncheck", "--code", str(startup)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert marker.exists(), f"QGIS exited ({proc.returncode}) without running startup.py:\n{proc.stderr[-3000:]}"
    result = json.loads(marker.read_text())
    assert "error" not in result, result["error"]
    assert result["active"] and result["provider"] and result["algorithm"]
    assert "Caption this layer" in result["actions"] and "Ask a question" in result["actions"]
    assert any("RS-MoE" in m for m in result["menu"])
    assert Path(result["plugin_file"]).is_relative_to(profile)  # the unpacked zip, not the repository
    assert result["screenshot"] and shot.exists()
