"""The plugin without the model: packaging, imports, settings, tiling, registration, error messages."""
from __future__ import annotations

import ast
import configparser
import zipfile
from pathlib import Path

import pytest
from qgis.core import Qgis, QgsApplication, QgsRectangle, QgsVectorLayer

from tests.qgis.conftest import REPO, stub_engine

ALLOWED_TOP_LEVEL = {"qgis", "rsmoe_plugin", "processing", "numpy", "__future__"}


def test_zip_holds_the_package_with_its_metadata(tmp_path: Path) -> None:
    from scripts.package_plugin import build

    zip_path = build(tmp_path / "rsmoe_plugin.zip")
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        meta_text = zf.read("rsmoe_plugin/metadata.txt").decode("utf-8")
    assert all(n.startswith("rsmoe_plugin/") for n in names)
    for required in ("rsmoe_plugin/__init__.py", "rsmoe_plugin/plugin.py", "rsmoe_plugin/icon.svg",
                     "rsmoe_plugin/processing_provider/annotate_tiles.py"):
        assert required in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string(meta_text)
    general = meta["general"]
    assert general["qgisMinimumVersion"] == "3.22"
    assert general["hasProcessingProvider"] == "yes"
    for key in ("name", "description", "version", "author", "about", "tracker", "repository"):
        assert general[key].strip()
    assert "/home/" not in meta_text and "/work/" not in meta_text and "/root/" not in meta_text


def test_plugin_imports_only_qgis_and_the_standard_library() -> None:
    import sys

    stdlib = set(sys.stdlib_module_names)
    for path in sorted((REPO / "rsmoe_plugin").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in stdlib or top in ALLOWED_TOP_LEVEL, f"{path.name} imports {name}"
        text = path.read_text(encoding="utf-8")
        for machine_specific in ("/work/", "/home/", "/root/", "/tmp/"):
            assert machine_specific not in text, f"{path.name} holds the path {machine_specific}"


def test_environment_overrides_settings() -> None:
    from rsmoe_plugin.settings import MODE_CONNECT, MODE_START, EngineSettings

    stored = EngineSettings(mode=MODE_CONNECT, url="http://127.0.0.1:1", token="stored")
    started = stored.with_environment({"RSMOE_ENGINE_PYTHON": "/opt/venv/bin/python"})
    assert (started.mode, started.python, started.source) == (MODE_START, "/opt/venv/bin/python", "environment")
    connected = stored.with_environment({"RSMOE_ENGINE_PYTHON": "/x/python", "RSMOE_ENGINE_URL": "http://127.0.0.1:9",
                                         "RSMOE_ENGINE_TOKEN": "t0k", "RSMOE_ENGINE_DEVICE": "cuda"})
    assert (connected.mode, connected.url, connected.token, connected.device) == (
        MODE_CONNECT, "http://127.0.0.1:9", "t0k", "cuda")
    assert stored.with_environment({}) is stored


def test_settings_round_trip_through_qgssettings() -> None:
    from rsmoe_plugin.settings import EngineSettings, load_settings, save_settings

    before = load_settings(apply_environment=False)
    try:
        wanted = EngineSettings(mode="connect", url="http://127.0.0.1:8765", token="abc", backend="onnx",
                                device="cpu", startup_timeout_s=42.0)
        save_settings(wanted)
        assert load_settings(apply_environment=False) == wanted
    finally:
        save_settings(before)


def test_engine_command_accepts_interpreter_venv_or_rsmoe(tmp_path: Path) -> None:
    from rsmoe_plugin.engine_manager import engine_command
    from rsmoe_plugin.settings import EngineSettings

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    settings = EngineSettings(model_dir=str(tmp_path / "model"), backend="onnx", device="cpu")
    token = tmp_path / "engine.json"
    cmd = engine_command(str(venv), token, settings)
    assert cmd[:4] == [str(venv / "bin" / "python"), "-m", "engine.cli", "serve"]
    assert cmd[cmd.index("--token-file") + 1] == str(token)
    assert cmd[cmd.index("--backend") + 1] == "onnx" and cmd[cmd.index("--device") + 1] == "cpu"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and "--stop-on-stdin-eof" in cmd
    assert engine_command(str(venv / "bin" / "rsmoe"), token, settings)[1] == "serve"


def test_tile_grid_follows_the_engine_rules() -> None:
    from rsmoe_plugin.errors import BadLayerError
    from rsmoe_plugin.tiling import RenderGrid, tile_grid

    tiles = tile_grid(300, 200, 128, 28)  # step 100: starts 0, 100, 200 (clipped) and 0, 100
    assert [(t.row, t.col, t.window.to_list()) for t in tiles] == [
        (0, 0, [0, 0, 128, 128]), (0, 1, [100, 0, 128, 128]), (0, 2, [200, 0, 100, 128]),
        (1, 0, [0, 100, 128, 100]), (1, 1, [100, 100, 128, 100]), (1, 2, [200, 100, 100, 100])]
    assert [t.window.to_list() for t in tile_grid(100, 50, 512)] == [[0, 0, 100, 50]]
    # an edge strip narrower than half a tile joins the tile before it, as in the engine
    assert [t.window.to_list() for t in tile_grid(1000, 700, 512)] == [[0, 0, 512, 700], [512, 0, 488, 700]]
    with pytest.raises(BadLayerError, match="overlap"):
        tile_grid(100, 100, 64, 64)
    grid = RenderGrid.of(QgsRectangle(0, 0, 1000, 500), 10.0)
    assert (grid.width, grid.height) == (100, 50)
    e = grid.tile_extent(tiles[4].window)
    assert (e.xMinimum(), e.yMaximum(), e.width(), e.height()) == (1000.0, -500.0, 1280.0, 1000.0)


def test_unreachable_engine_gives_a_clear_message() -> None:
    import socket

    from rsmoe_plugin.engine_manager import EngineManager
    from rsmoe_plugin.errors import ConfigurationError, EngineUnreachableError
    from rsmoe_plugin.settings import EngineSettings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = EngineManager(lambda: EngineSettings(mode="connect", url=f"http://127.0.0.1:{port}", token="x"))
    with pytest.raises(EngineUnreachableError,
                       match=r"no RS-MoE engine answers at http://127\.0\.0\.1:\d+.*rsmoe serve"):
        manager.health()
    assert manager.status.state == "failed"
    unset = EngineManager(lambda: EngineSettings(mode="connect", url="http://127.0.0.1:1"))
    with pytest.raises(ConfigurationError, match="no token"):
        unset.health()


def test_caption_batch_falls_back_to_one_request_per_region_on_an_older_engine() -> None:
    """An engine without POST /caption/batch (404 'no such endpoint') gets POST /caption per region, in order;
    any other refusal of the batch is the user's to see."""
    from rsmoe_plugin.client import EngineClient
    from rsmoe_plugin.errors import EngineRequestError

    seen: list[str] = []

    def older_engine(path: str, body: dict) -> tuple[int, dict]:
        seen.append(path)
        if path == "/caption":
            return 200, {"text": f"tile {body['image_base64']}", "task": "caption"}
        if body["items"][0]["image_base64"] == "bad":
            return 422, {"error": "items[0]: cannot open the image bytes"}
        return 404, {"error": "no such endpoint: POST /caption/batch"}

    with stub_engine(older_engine) as url:
        client = EngineClient(url, "token")
        answers = client.caption_batch([{"image_base64": "a"}, {"image_base64": "b"}])
        assert [a.text for a in answers] == ["tile a", "tile b"]
        assert seen == ["/caption/batch", "/caption", "/caption"]
        with pytest.raises(EngineRequestError, match=r"items\[0\]: cannot open"):
            client.caption_batch([{"image_base64": "bad"}])


def test_missing_interpreter_gives_a_clear_message(tmp_path: Path) -> None:
    from rsmoe_plugin.engine_manager import EngineManager
    from rsmoe_plugin.errors import EngineStartError
    from rsmoe_plugin.settings import EngineSettings

    manager = EngineManager(lambda: EngineSettings(python=str(tmp_path / "no-such-python")))
    with pytest.raises(EngineStartError, match="cannot run .*no-such-python.*RSMOE_ENGINE_PYTHON"):
        manager.health()
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'No module named engine' >&2\nexit 1\n")
    broken.chmod(0o755)
    manager = EngineManager(lambda: EngineSettings(python=str(broken)))
    with pytest.raises(EngineStartError, match=r"exited while starting \(exit code 1\).*no RS-MoE engine installed"):
        manager.health()


def test_init_gui_registers_actions_panels_and_the_provider(plugin, qgis_iface) -> None:  # noqa: ANN001
    registry = QgsApplication.processingRegistry()
    assert registry.providerById("rsmoe") is not None
    alg = registry.algorithmById("rsmoe:annotatetiles")
    assert alg is not None
    assert [p.name() for p in alg.parameterDefinitions()] == [
        "INPUT", "EXTENT", "TILE_SIZE", "OVERLAP", "STYLE", "RESOLUTION", "OUTPUT"]
    texts = [a.text() for a in plugin.actions]
    assert "Caption this layer" in texts and "Ask a question" in texts
    assert plugin.toolbar is not None and plugin.caption_action in plugin.toolbar.actions()
    assert plugin.caption_panel is not None and plugin.ask_dock is not None


def test_caption_without_a_raster_layer_says_what_to_do(plugin, qgis_iface, qgis_new_project) -> None:  # noqa: ANN001
    qgis_iface.messageBar().clear_messages()
    vector = QgsVectorLayer("Point?crs=EPSG:4326", "points", "memory")
    qgis_new_project.addMapLayer(vector)
    qgis_iface.setActiveLayer(vector)
    assert plugin.caption_active_layer() is None
    warnings = qgis_iface.messageBar().get_messages(Qgis.Warning)
    assert any("'points' is not a raster layer" in m for m in warnings), warnings
    assert "not a raster layer" in plugin.caption_panel.status_label.text()


def test_settings_dialog_stores_what_the_user_chose(qtbot) -> None:  # noqa: ANN001
    from rsmoe_plugin.gui.settings_dialog import SettingsDialog
    from rsmoe_plugin.settings import MODE_START, load_settings, save_settings
    from tests.qgis.conftest import screenshot_path

    before = load_settings(apply_environment=False)
    try:
        dialog = SettingsDialog()
        qtbot.addWidget(dialog)
        dialog.start_radio.setChecked(True)
        dialog.python_widget.setFilePath("/opt/rsmoe/.venv/bin/python")
        dialog.backend_combo.setCurrentText("onnx")
        dialog.device_edit.setText("cuda")
        dialog.show()
        qtbot.wait(50)
        assert dialog.grab().save(str(screenshot_path("settings_dialog.png")))
        dialog.accept()
        stored = load_settings(apply_environment=False)
        assert (stored.mode, stored.python, stored.backend, stored.device) == (
            MODE_START, "/opt/rsmoe/.venv/bin/python", "onnx", "cuda")
    finally:
        save_settings(before)
