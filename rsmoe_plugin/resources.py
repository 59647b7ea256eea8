"""Paths of the plugin's bundled files."""
from __future__ import annotations

import os

PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))


def icon_path(name: str = "icon.svg") -> str:
    return os.path.join(PLUGIN_DIR, name)
