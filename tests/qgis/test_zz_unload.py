"""Last: unloading the plugin (QGIS closing) removes its GUI and provider and stops the engine it started."""
from __future__ import annotations

import os
from pathlib import Path

from qgis.core import QgsApplication


def test_unload_removes_everything_and_stops_the_engine(plugin, engine) -> None:  # noqa: ANN001
    engine.health()
    pid = engine.process_id
    assert pid is not None
    log_path = Path(engine.status.log_path)
    assert log_path.exists()
    plugin.unload()
    assert QgsApplication.processingRegistry().providerById("rsmoe") is None
    assert plugin.actions == [] and plugin.caption_panel is None and plugin.ask_dock is None
    assert engine.process_id is None and engine.status.state == "stopped"
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, f"engine process {pid} still runs after unload"
    assert not log_path.parent.exists()  # its token file and log folder are gone
    plugin.unload()  # idempotent
