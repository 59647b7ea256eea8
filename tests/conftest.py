"""Main (engine) suite configuration.

``tests/qgis`` is the QGIS plugin suite: it needs Debian's Python with python3-qgis and runs in its
own pytest invocation (``.venv-qgis/bin/python -m pytest -q tests/qgis``, see tests/qgis/pytest.ini).
The engine venv cannot import qgis, so its collection skips that folder; ``test_qgis_suite.py`` runs it.
"""
from __future__ import annotations

import importlib.util

collect_ignore: list[str] = []
if importlib.util.find_spec("qgis") is None:
    collect_ignore.append("qgis")
