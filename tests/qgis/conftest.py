"""Fixtures of the QGIS suite: real QGIS (pytest-qgis), ONE real engine per session, real rasters.

The engine is started by the plugin itself, exactly as a user's QGIS would: ``RSMOE_ENGINE_PYTHON``
points at the engine venv (``.venv/bin/python``, or ``$RSMOE_TEST_ENGINE_PYTHON``) and the plugin's
engine manager runs ``python -m engine.cli serve`` on first use. Screenshots go to
``tests/qgis/screenshots/`` (or ``$RSMOE_SCREENSHOT_DIR``).
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qgis.core import (  # noqa: E402
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
)

DATA = REPO / "tests" / "data"
SCREENSHOTS = Path(os.environ.get("RSMOE_SCREENSHOT_DIR") or REPO / "tests" / "qgis" / "screenshots")
WEB_MERCATOR = 20037508.342789244
ENGINE_ENV = ("RSMOE_ENGINE_URL", "RSMOE_ENGINE_TOKEN", "RSMOE_ENGINE_TOKEN_FILE", "RSMOE_ENGINE_PYTHON",
              "RSMOE_ENGINE_MODEL", "RSMOE_ENGINE_BACKEND", "RSMOE_ENGINE_DEVICE")


def engine_python() -> Path:
    given = os.environ.get("RSMOE_TEST_ENGINE_PYTHON")
    return Path(given) if given else REPO / ".venv" / "bin" / "python"


def screenshot_path(name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS / name


def wait_for(qtbot, condition: Callable[[], bool], timeout_s: float) -> None:  # noqa: ANN001
    qtbot.waitUntil(condition, timeout=int(timeout_s * 1000))


def wait_task(qtbot, task, timeout_s: float = 600.0):  # noqa: ANN001, ANN201
    """Process events until an EngineTask has delivered its outcome on the main thread."""
    from rsmoe_plugin.tasks import running_tasks

    assert task is not None
    wait_for(qtbot, lambda: task.outcome is not None and task not in running_tasks(), timeout_s)
    return task.outcome


# --------------------------------------------------------------------------------------------
# The engine and the plugin
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def engine(qgis_app):  # noqa: ANN001, ANN201
    """The plugin's engine manager with a started engine (started by the plugin, reused by every test)."""
    python = engine_python()
    if not python.exists():
        pytest.fail(f"the engine venv is missing ({python}): run `bash scripts/setup.sh --test` first")
    saved = {k: os.environ.pop(k) for k in ENGINE_ENV if k in os.environ}
    os.environ["RSMOE_ENGINE_PYTHON"] = str(python)
    from rsmoe_plugin.engine_manager import get_manager, shutdown_manager

    manager = get_manager()
    start = time.monotonic()
    health = manager.health()
    sys.stderr.write(f"\n[engine] {health.summary()} ready in {time.monotonic() - start:.1f} s\n")
    yield manager
    shutdown_manager()
    os.environ.pop("RSMOE_ENGINE_PYTHON", None)
    os.environ.update(saved)


@pytest.fixture(scope="session")
def engine_wheel(tmp_path_factory) -> Path:  # noqa: ANN001
    """The engine wheel, built once per session by scripts/build_wheel.py."""
    from scripts.build_wheel import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"))


@contextmanager
def stored_settings() -> Iterator[None]:
    """Restore the plugin's stored engine settings and set-up choices (QgsSettings) after the block."""
    from rsmoe_plugin.settings import load_settings, load_setup_choices, save_settings, save_setup_choices

    settings, choices = load_settings(apply_environment=False), load_setup_choices()
    try:
        yield
    finally:
        save_settings(settings)
        save_setup_choices(choices)


@pytest.fixture(scope="session")
def plugin(qgis_iface, qgis_processing, engine):  # noqa: ANN001, ANN201
    """The plugin as QGIS loads it: classFactory(iface) + initGui()."""
    import rsmoe_plugin

    window = qgis_iface.mainWindow()  # shown (offscreen) so the canvas has its real size and extent
    window.resize(1000, 700)
    window.show()
    QgsApplication.processEvents()
    instance = rsmoe_plugin.classFactory(qgis_iface)
    instance.initGui()
    yield instance
    instance.unload()


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------
def add_raster(uri: str, name: str, provider: str = "gdal") -> QgsRasterLayer:
    layer = QgsRasterLayer(uri, name, provider)
    assert layer.isValid(), f"cannot open {uri}"
    QgsProject.instance().addMapLayer(layer)
    return layer


def show_on_canvas(iface, layer: QgsRasterLayer, extent: QgsRectangle | None = None,  # noqa: ANN001
                   crs: QgsCoordinateReferenceSystem | None = None) -> None:
    """Make ``layer`` active and the canvas show ``extent`` (in ``crs``, default the layer's)."""
    canvas = iface.mapCanvas()
    crs = crs or layer.crs()
    canvas.setDestinationCrs(crs)
    canvas.setLayers([layer])
    if extent is None:
        extent = QgsCoordinateTransform(layer.crs(), crs, QgsProject.instance()).transformBoundingBox(layer.extent())
    for _ in range(2):  # pending resize events may change the extent: let them happen, then set it again
        canvas.setExtent(extent)
        QgsApplication.processEvents()
    canvas.refresh()
    iface.setActiveLayer(layer)


@pytest.fixture
def s2_layer(qgis_new_project) -> QgsRasterLayer:  # noqa: ANN001
    """Sentinel-2 true colour, 512 x 512, EPSG:32618 (a local GeoTIFF: sent by path)."""
    return add_raster(str(DATA / "s2_crop512.tif"), "Sentinel-2 Virginia")


@pytest.fixture
def world_layer(qgis_new_project) -> QgsRasterLayer:  # noqa: ANN001
    """Global RGB, EPSG:4326."""
    return add_raster(str(DATA / "world_rgb_4326.tif"), "World EPSG:4326")


def _render_pyramid(source: QgsRasterLayer, root: Path, zooms: range) -> int:
    from rsmoe_plugin.rendering import render_image

    mercator = QgsCoordinateReferenceSystem("EPSG:3857")
    bounds = QgsCoordinateTransform(source.crs(), mercator, QgsProject.instance()).transformBoundingBox(source.extent())
    count = 0
    for z in zooms:
        size = 2 * WEB_MERCATOR / 2 ** z
        xs = range(int((bounds.xMinimum() + WEB_MERCATOR) // size), int((bounds.xMaximum() + WEB_MERCATOR) // size) + 1)
        ys = range(int((WEB_MERCATOR - bounds.yMaximum()) // size), int((WEB_MERCATOR - bounds.yMinimum()) // size) + 1)
        for x in xs:
            for y in ys:
                extent = QgsRectangle(-WEB_MERCATOR + x * size, WEB_MERCATOR - (y + 1) * size,
                                      -WEB_MERCATOR + (x + 1) * size, WEB_MERCATOR - y * size)
                path = root / str(z) / str(x) / f"{y}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                assert render_image(source, extent, mercator, 256, 256).save(str(path), "PNG")
                count += 1
    return count


@pytest.fixture(scope="session")
def xyz_pyramid(qgis_app, tmp_path_factory) -> Path:  # noqa: ANN001
    """A small XYZ tile pyramid (zoom 12-14, 256 px PNG tiles) rendered from the Sentinel-2 crop."""
    root = tmp_path_factory.mktemp("xyz") / "tiles"
    source = QgsRasterLayer(str(DATA / "s2_crop512.tif"), "source")
    assert source.isValid()
    assert _render_pyramid(source, root, range(12, 15)) > 0
    return root


@pytest.fixture
def xyz_layer(qgis_new_project, xyz_pyramid) -> QgsRasterLayer:  # noqa: ANN001
    """An XYZ tile layer over file:// tiles (no network): rendered by QGIS, sent as PNG."""
    url = xyz_pyramid.as_uri() + "/{z}/{x}/{y}.png"
    return add_raster(f"type=xyz&url={url}&zmin=12&zmax=14", "XYZ Sentinel-2 tiles", "wms")


def s2_mercator_extent(fraction: float = 1.0, aspect: float | None = None) -> QgsRectangle:
    """The Sentinel-2 crop's extent in EPSG:3857, shrunk around its centre to ``fraction`` of its width
    (and to width / ``aspect`` high when ``aspect`` is given)."""
    source = QgsRasterLayer(str(DATA / "s2_crop512.tif"), "source")
    full = QgsCoordinateTransform(source.crs(), QgsCoordinateReferenceSystem("EPSG:3857"),
                                  QgsProject.instance()).transformBoundingBox(source.extent())
    c = full.center()
    half_w = full.width() * fraction / 2
    half_h = half_w / aspect if aspect else full.height() * fraction / 2
    return QgsRectangle(c.x() - half_w, c.y() - half_h, c.x() + half_w, c.y() + half_h)


def approx_equal(a: float, b: float, rel: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


def install_zip_into_profile(root: Path) -> Path:
    """Build the zip, unpack it into ``root/profiles/default/python/plugins`` and enable it there."""
    from scripts.package_plugin import build

    zip_path = build(root / "dist" / "rsmoe_plugin.zip")
    profile = root / "profiles" / "default"
    plugins = profile / "python" / "plugins"
    plugins.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(plugins)
    ini = profile / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True)
    ini.write_text("[PythonPlugins]\nrsmoe_plugin=true\n", encoding="utf-8")
    return profile


@contextmanager
def stub_engine(answer: Callable[[str, dict], tuple[int, dict]]) -> Iterator[str]:
    """A fake engine on 127.0.0.1 (an older one, say): ``answer(path, json_body)`` gives each POST's status and
    JSON answer; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            status, reply = answer(self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
