"""Run the QGIS plugin suite (tests/qgis) from the main suite, so the README's one test command covers it.

The QGIS suite needs Debian's Python with python3-qgis, so it runs as a subprocess in ``.venv-qgis``
(made by ``bash scripts/setup.sh --test``); its output is printed and its exit status asserted.
``RSMOE_QGIS_SUITE=separate`` skips this (``.ci/run`` runs the QGIS suite on its own).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
QGIS_PYTHON = REPO / ".venv-qgis" / "bin" / "python"


@pytest.mark.slow
def test_qgis_plugin_suite_passes() -> None:
    if os.environ.get("RSMOE_QGIS_SUITE") == "separate":
        pytest.skip("the QGIS suite runs separately (RSMOE_QGIS_SUITE=separate)")
    if not QGIS_PYTHON.exists():
        pytest.skip(".venv-qgis is missing: run `bash scripts/setup.sh --test` to set up the QGIS suite")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["QT_QPA_PLATFORM"] = "offscreen"
    proc = subprocess.run([str(QGIS_PYTHON), "-m", "pytest", "-q", "tests/qgis"], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600)
    sys.stdout.write("\n--- QGIS suite (tests/qgis, .venv-qgis) ---\n" + proc.stdout[-30000:])
    assert proc.returncode == 0, f"the QGIS suite failed (exit {proc.returncode}):\n{proc.stdout[-15000:]}"
