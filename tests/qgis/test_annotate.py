"""Batch tile annotation (``rsmoe:annotatetiles``): the Processing dialog, processing.run, cancel,
rendered (XYZ) layers, and ``qgis_process`` with the plugin installed from its zip into a profile."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from qgis.core import (
    QgsExpression,
    QgsExpressionContext,
    QgsExpressionContextUtils,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProject,
    QgsVectorLayer,
)

from tests.qgis.conftest import (
    DATA,
    REPO,
    engine_python,
    install_zip_into_profile,
    s2_mercator_extent,
    screenshot_path,
    show_on_canvas,
    wait_for,
)

ALG = "rsmoe:annotatetiles"
CORE = ["tile_index", "window", "caption", "skipped", "valid_fraction", "ground_resolution_m"]
EXTRA = ["backend", "col", "model_id", "model_resolution_m", "router", "row", "scene", "scene_confidence", "segments",
         "uncertain", "uncertainty"]


class RecordingFeedback(QgsProcessingFeedback):
    """Keeps what the algorithm reports; cancels once progress passes ``cancel_above`` (if given)."""

    def __init__(self, cancel_above: float | None = None, cancel_on_info: str | None = None) -> None:
        super().__init__()
        self.cancel_on_info = cancel_on_info
        self.infos: list[str] = []
        self.errors: list[str] = []
        self.progress_values: list[float] = []
        self.cancel_above = cancel_above
        self.progressChanged.connect(self._progress)

    def _progress(self, value: float) -> None:
        self.progress_values.append(value)
        if self.cancel_above is not None and value > self.cancel_above and not self.isCanceled():
            self.cancel()

    def pushInfo(self, info: str) -> None:  # noqa: N802
        self.infos.append(info)
        if self.cancel_on_info is not None and self.cancel_on_info in info:
            self.cancel()
        super().pushInfo(info)

    def reportError(self, error: str, fatalError: bool = False) -> None:  # noqa: N802, N803
        self.errors.append(error)
        super().reportError(error, fatalError)


def _check_geojson(path: Path, expected_tiles: int) -> dict:
    fc = json.loads(path.read_text(encoding="utf-8"))
    assert fc["type"] == "FeatureCollection" and fc["rsmoe"]["coordinate_space"] == "EPSG:4326"
    assert [f["id"] for f in fc["features"]] == list(range(expected_tiles))
    for f in fc["features"]:
        props = f["properties"]
        assert list(props) == CORE + EXTRA  # one schema for engine jobs and rendered tiles
        assert props["caption"] and props["skipped"] is None and props["segments"][0]["text"]
        assert f["geometry"]["type"] == "Polygon"
        for lon, lat in f["geometry"]["coordinates"][0]:
            assert -180 <= lon <= 180 and -90 <= lat <= 90
    return fc


def _map_tip(layer: QgsVectorLayer, feature) -> str:  # noqa: ANN001
    context = QgsExpressionContext(QgsExpressionContextUtils.globalProjectLayerScopes(layer))
    context.setFeature(feature)
    return QgsExpression.replaceExpressionText(layer.mapTipTemplate(), context)


@pytest.fixture
def browser_model(qgis_iface, monkeypatch):  # noqa: ANN001, ANN201
    """The Processing dialog asks the iface for QGIS's browser model, which pytest-qgis's stub lacks."""
    from qgis.gui import QgsBrowserGuiModel

    model = QgsBrowserGuiModel()
    monkeypatch.setattr(qgis_iface, "browserModel", lambda: model, raising=False)
    yield model


def test_processing_dialog_runs_loads_and_styles_the_result(plugin, qgis_iface, qtbot, s2_layer,  # noqa: ANN001
                                                            tmp_path, browser_model) -> None:
    import processing
    from processing.core.ProcessingConfig import ProcessingConfig

    show_on_canvas(qgis_iface, s2_layer)
    out = tmp_path / "s2 tiles.geojson"
    ProcessingConfig.setSettingValue(ProcessingConfig.KEEP_DIALOG_OPEN, True)
    dialog = processing.createAlgorithmDialog(ALG, {"INPUT": s2_layer.id(), "TILE_SIZE": 256, "OVERLAP": 0,
                                                    "OUTPUT": str(out)})
    assert dialog is not None
    dialog.resize(900, 640)
    dialog.show()
    qtbot.wait(100)
    assert dialog.grab().save(str(screenshot_path("processing_dialog.png")))
    finished: list[tuple[bool, dict]] = []
    dialog.algorithmFinished.connect(lambda ok, results: finished.append((ok, results)))
    dialog.runAlgorithm()  # runs in a QgsProcessingAlgRunnerTask: QGIS stays responsive
    wait_for(qtbot, lambda: bool(finished), 600)
    qtbot.wait(100)
    assert dialog.grab().save(str(screenshot_path("processing_dialog_log.png")))
    ok, results = finished[0]
    assert ok, dialog.textLog.toPlainText() if hasattr(dialog, "textLog") else results
    assert results["TILES"] == 4 and results["CAPTIONED"] == 4
    fc = _check_geojson(out, 4)
    assert fc["rsmoe"]["source_crs"] == "EPSG:32618" and fc["rsmoe"]["tiling"]["tile_size"] == "256px"
    assert [f["properties"]["window"] for f in fc["features"]] == [
        [0, 0, 256, 256], [256, 0, 256, 256], [0, 256, 256, 256], [256, 256, 256, 256]]
    dialog.close()

    layers = QgsProject.instance().mapLayersByName("Sentinel-2 Virginia captions")
    assert len(layers) == 1, [lyr.name() for lyr in QgsProject.instance().mapLayers().values()]
    layer = layers[0]
    assert layer.featureCount() == 4 and layer.crs().authid() == "EPSG:4326"
    feature = next(layer.getFeatures())
    tip = _map_tip(layer, feature)
    assert feature["caption"][:30] in tip and "<b>theme</b>" in tip
    for f in layer.getFeatures():  # the map tip says when the model was unsure of a tile
        props = next(p["properties"] for p in fc["features"] if p["id"] == f["tile_index"])
        assert ("Unsure: " + "; ".join(props["uncertainty"]) in _map_tip(layer, f)) == props["uncertain"]
        assert ("Unsure" in _map_tip(layer, f)) == props["uncertain"]
    assert layer.displayExpression().startswith('coalesce("caption"')
    assert layer.renderer().symbol().color().alpha() < 60  # tiles outlined, the imagery shows through
    _save_map(layer, s2_layer, feature, tip, screenshot_path("annotation_layer.png"))


def _save_map(layer: QgsVectorLayer, raster, feature, tip: str, path: Path) -> None:  # noqa: ANN001
    """The caption layer over the raster, with the first tile's map tip drawn beside it."""
    from qgis.PyQt.QtCore import QRectF
    from qgis.PyQt.QtGui import QColor, QPainter, QTextDocument

    image = render_image_layers([layer, raster], raster.crs(), raster.extent(), 512)
    canvas = image.copy(0, 0, 512 + 360, 512)
    canvas.fill(QColor("white"))
    painter = QPainter(canvas)
    painter.drawImage(0, 0, image)
    doc = QTextDocument()
    doc.setHtml(tip)
    doc.setTextWidth(340)
    painter.translate(520, 10)
    doc.drawContents(painter, QRectF(0, 0, 340, 490))
    painter.end()
    assert canvas.save(str(path))


def render_image_layers(layers, crs, extent, size: int):  # noqa: ANN001, ANN201
    from qgis.core import QgsMapRendererCustomPainterJob, QgsMapSettings
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor, QImage, QPainter

    settings = QgsMapSettings()
    settings.setLayers(layers)
    settings.setDestinationCrs(crs)
    settings.setOutputSize(QSize(size, size))
    settings.setExtent(extent)
    settings.setBackgroundColor(QColor("white"))
    image = QImage(size, size, QImage.Format_ARGB32)
    image.fill(QColor("white"))
    painter = QPainter(image)
    job = QgsMapRendererCustomPainterJob(settings, painter)
    job.start()
    job.waitForFinished()
    painter.end()
    return image


@pytest.fixture
def engine_requests(monkeypatch):  # noqa: ANN001, ANN201
    """Every request the plugin sends to the engine, as (method, path)."""
    from rsmoe_plugin.client import EngineClient

    sent: list[tuple[str, str]] = []
    original = EngineClient.request

    def counting(self, method: str, path: str, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        sent.append((method, path))
        return original(self, method, path, *args, **kwargs)

    monkeypatch.setattr(EngineClient, "request", counting)
    return sent


def test_rendered_xyz_layer_is_tiled_by_the_plugin(plugin, qtbot, xyz_layer, tmp_path,  # noqa: ANN001
                                                   engine_requests) -> None:  # noqa: ANN001
    import processing

    extent = s2_mercator_extent(0.5, aspect=2.0)
    resolution = extent.width() / 256  # a 256 x 128 px rendering: 2 tiles of 128 px
    out = tmp_path / "xyz.geojson"
    feedback = RecordingFeedback()
    results = processing.run(ALG, {
        "INPUT": xyz_layer, "EXTENT": f"{extent.xMinimum()},{extent.xMaximum()},{extent.yMinimum()},"
                                      f"{extent.yMaximum()} [EPSG:3857]",
        "TILE_SIZE": 128, "RESOLUTION": resolution, "OUTPUT": str(out)}, feedback=feedback)
    assert results["TILES"] == 2 and results["CAPTIONED"] == 2
    captions = [path for method, path in engine_requests if path.startswith("/caption")]
    assert captions == ["/caption/batch"]  # both rendered tiles in one request, one model batch: not one per tile
    fc = _check_geojson(out, 2)
    assert fc["rsmoe"]["rendered_by"] == "qgis" and fc["rsmoe"]["source_crs"] == "EPSG:3857"
    assert fc["rsmoe"]["raster_size"] == [256, 128]
    assert [f["properties"]["window"] for f in fc["features"]] == [[0, 0, 128, 128], [128, 0, 128, 128]]
    assert any("rendered by QGIS" in i for i in feedback.infos)
    assert feedback.progress_values[-1] == pytest.approx(100.0)
    # the footprints tile the requested extent (a small area in Virginia)
    lons = [p[0] for f in fc["features"] for p in f["geometry"]["coordinates"][0]]
    lats = [p[1] for f in fc["features"] for p in f["geometry"]["coordinates"][0]]
    assert -75.7 < min(lons) < max(lons) < -75.6 and 37.70 < min(lats) < max(lats) < 37.76
    for f in fc["features"]:  # each rendered tile went with its metres per pixel: the model saw 128 px of them
        p = f["properties"]
        assert p["ground_resolution_m"] > 0
        assert p["model_resolution_m"] == pytest.approx(p["ground_resolution_m"] * 128 / 224, rel=2e-3)


def test_default_tile_size_is_the_engines(plugin, s2_layer, tmp_path) -> None:  # noqa: ANN001
    """TILE_SIZE left at 0: the engine chooses (10 m pixels: the lite model's coarsest trained footprint, 2.56 km
    = 256 px, as 512 px tiles would be seen at 22.9 m); the rendered path follows the engine's rule from /health."""
    import processing

    from rsmoe_plugin.annotation import default_rendered_tile, rendered_tile_warning

    out = tmp_path / "default.geojson"
    results = processing.run(ALG, {"INPUT": s2_layer, "OUTPUT": str(out)})
    assert results["TILES"] == 4
    fc = _check_geojson(out, 4)
    assert fc["rsmoe"]["tiling"]["tile_size"] == "2560m"
    assert [f["properties"]["window"][2:] for f in fc["features"]] == [[256, 256]] * 4
    health = {"image_size": 224, "resolution": {"conditioned": True, "min_m": 0.3, "max_m": 12.0, "tile_m": 150.0}}
    assert default_rendered_tile(health, 0.05) == (3000, "150m")  # 5 cm pixels: 150 m tiles, seen at 0.67 m/px
    assert default_rendered_tile(health, 10.0) == (269, "2688m")  # too coarse for 150 m: 12 m x 224 px
    assert default_rendered_tile(health, 2.0) == (512, "512px")  # 512 px seen at 4.6 m: in range
    assert default_rendered_tile(health, 30.0) == (512, "512px")  # pixels coarser than the range
    assert default_rendered_tile({}, 0.05) == (512, "512px")  # an older engine
    warning = rendered_tile_warning(health, 0.05, 512, "512px")  # seen at 0.114 m/px
    assert "finer than its trained range 0.3-12 m/px" in warning and "tiles of 67.2m to 2.69km (1344 to 53760 px here)" in warning
    assert rendered_tile_warning(health, 0.05, 3000, "150m") is None


def _no_output_left(out: Path) -> None:
    assert not out.exists(), "a cancelled run must not write its output"
    assert sorted(p.name for p in out.parent.iterdir()) == [], "no temp file or journal may be left"


def test_cancelled_engine_job_leaves_no_output(plugin, s2_layer, tmp_path) -> None:  # noqa: ANN001
    import processing

    out = tmp_path / "run" / "cancelled.geojson"
    out.parent.mkdir()
    feedback = RecordingFeedback(cancel_on_info="engine job")  # cancel as soon as the job is submitted
    assert plugin_engine_batch_size() < 256, "the job must hold more tiles than one batch"
    with pytest.raises(QgsProcessingException, match=r"cancelled after \d+ of 256 tiles; nothing was written"):
        processing.run(ALG, {"INPUT": s2_layer, "TILE_SIZE": 32, "OUTPUT": str(out)}, feedback=feedback)
    assert feedback.isCanceled()
    assert any("cancelling engine job" in i for i in feedback.infos), feedback.infos
    _no_output_left(out)


def test_cancelled_rendered_run_leaves_no_output(plugin, xyz_layer, tmp_path, engine_requests) -> None:  # noqa: ANN001
    import processing

    extent = s2_mercator_extent(0.5, aspect=2.0)
    out = tmp_path / "run" / "cancelled.geojson"
    out.parent.mkdir()
    batch = plugin_engine_batch_size()
    assert batch < 128, "the extent must hold more tiles than one batch"
    feedback = RecordingFeedback(cancel_above=0.0)  # cancel after the first batch of rendered tiles
    with pytest.raises(QgsProcessingException, match=f"cancelled after {batch} of 128 tiles; nothing was written"):
        processing.run(ALG, {  # 1024 x 512 rendered pixels: 16 x 8 tiles
            "INPUT": xyz_layer, "EXTENT": f"{extent.xMinimum()},{extent.xMaximum()},{extent.yMinimum()},"
                                          f"{extent.yMaximum()} [EPSG:3857]",
            "TILE_SIZE": 64, "RESOLUTION": extent.width() / 1024, "OUTPUT": str(out)}, feedback=feedback)
    assert [p for _, p in engine_requests if p.startswith("/caption")] == ["/caption/batch"]  # then it stopped
    _no_output_left(out)


def plugin_engine_batch_size() -> int:
    """Tiles per batch request: the engine's model batch (``rsmoe serve --batch-size``)."""
    from rsmoe_plugin.engine_manager import get_manager

    return int(get_manager().health().raw["batch_size"])


# --------------------------------------------------------------------------------------------
# qgis_process with the plugin installed from its zip
# --------------------------------------------------------------------------------------------
def test_qgis_process_runs_the_installed_plugin(engine, tmp_path) -> None:  # noqa: ANN001
    qgis_process = Path("/usr/bin/qgis_process.bin")
    if not qgis_process.exists():
        pytest.skip("qgis_process.bin is not installed")
    install_zip_into_profile(tmp_path / "qgis")
    client = engine.ensure()
    out = tmp_path / "out" / "world.geojson"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RSMOE_ENGINE_")}
    env.update(QT_QPA_PLATFORM="offscreen", QGIS_CUSTOM_CONFIG_PATH=str(tmp_path / "qgis"),
               RSMOE_ENGINE_URL=client.url, RSMOE_ENGINE_TOKEN=client.token)
    cmd = [str(qgis_process), "--json", "run", ALG, "--",
           f"INPUT={DATA / 'world_rgb_4326.tif'}",
           "EXTENT=-2000000,3000000,4000000,8000000 [EPSG:3857]",  # xmin,xmax,ymin,ymax
           "TILE_SIZE=64", f"OUTPUT={out}"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["results"]["OUTPUT"] == str(out)
    tiles = report["results"]["TILES"]
    assert tiles >= 1 and report["results"]["CAPTIONED"] == tiles
    fc = _check_geojson(out, tiles)
    assert fc["rsmoe"]["source_crs"] == "EPSG:4326"
    for f in fc["features"]:  # within (or on the edge of) the requested extent: about 18 W .. 27 E, 33 .. 59 N
        for lon, lat in f["geometry"]["coordinates"][0]:
            assert -19 <= lon <= 28 and 32 <= lat <= 60, (lon, lat)


def test_map_tip_shows_when_the_model_was_unsure(tmp_path) -> None:  # noqa: ANN001
    """The styled layer's map tip carries the unsure note where ``uncertain`` is true; layers of older engines
    (no such field) keep the plain tip."""
    from rsmoe_plugin.layer_style import MAP_TIP_TEMPLATE, style_annotation_layer

    def feature(i: int, caption: str | None, uncertain: bool | None, reasons: list[str] | None) -> dict:
        square = [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]
        return {"type": "Feature", "id": i, "geometry": {"type": "Polygon", "coordinates": square},
                "properties": {"tile_index": i, "caption": caption, "skipped": None if caption else "no valid pixels",
                               "segments": [{"expert": "theme", "text": "sand"}] if caption else None,
                               "uncertain": uncertain, "uncertainty": reasons}}

    reasons = ["scene unsure (0.41)", "resolution 0.05 m/px is finer than the trained range 0.3-12 m/px"]
    path = tmp_path / "tiles.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        feature(0, "A beach.", True, reasons), feature(1, "A field.", False, []), feature(2, None, None, None)]}))
    layer = QgsVectorLayer(str(path), "tiles", "ogr")
    assert layer.isValid()
    style_annotation_layer(layer)
    tips = [_map_tip(layer, f) for f in layer.getFeatures()]
    assert f"Unsure: {'; '.join(reasons)}; the caption may be wrong." in tips[0] and "<b>theme</b>" in tips[0]
    assert "Unsure" not in tips[1] and "Unsure" not in tips[2] and "skipped: no valid pixels" in tips[2]
    old = tmp_path / "old.geojson"
    old.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {**feature(0, "A beach.", None, None), "properties": {"tile_index": 0, "caption": "A beach.", "skipped": None,
                                                            "segments": None}}]}))
    old_layer = QgsVectorLayer(str(old), "old", "ogr")
    style_annotation_layer(old_layer)
    assert old_layer.mapTipTemplate() == MAP_TIP_TEMPLATE and "A beach." in _map_tip(old_layer, next(
        old_layer.getFeatures()))


def test_schema_matches_between_engine_jobs_and_rendered_tiles() -> None:
    """The plugin's GeoJSON writer and the engine's agree on names and order (read from the engine's source;
    the tests above also compare real outputs of both paths with the same list)."""
    import ast

    from rsmoe_plugin.features import CORE_PROPERTIES, EXTRA_PROPERTIES

    tree = ast.parse((REPO / "engine" / "outputs.py").read_text(encoding="utf-8"))
    engine_core = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                       and any(getattr(t, "id", None) == "CORE_PROPERTIES" for t in node.targets))
    assert tuple(engine_core) == tuple(CORE_PROPERTIES) == tuple(CORE)
    engine_jobs = (REPO / "engine" / "jobs.py").read_text(encoding="utf-8")
    for name in EXTRA_PROPERTIES:
        assert name in engine_jobs
    assert list(EXTRA_PROPERTIES) == sorted(EXTRA_PROPERTIES) == EXTRA  # the engine writes extras sorted


def _engine_processes() -> set[int]:
    """Pids of running `engine.cli serve` processes (Linux /proc)."""
    pids = set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"engine.cli" in cmdline and b"serve" in cmdline:
            pids.add(int(entry.name))
    return pids


def test_qgis_process_starts_and_stops_its_own_engine(engine, tmp_path) -> None:  # noqa: ANN001
    """RSMOE_ENGINE_PYTHON under qgis_process: the plugin starts an engine for the run and stops it after."""
    qgis_process = Path("/usr/bin/qgis_process.bin")
    if not qgis_process.exists():
        pytest.skip("qgis_process.bin is not installed")
    install_zip_into_profile(tmp_path / "qgis")
    before = _engine_processes()
    out = tmp_path / "out" / "s2.geojson"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RSMOE_ENGINE_")}
    env.update(QT_QPA_PLATFORM="offscreen", QGIS_CUSTOM_CONFIG_PATH=str(tmp_path / "qgis"),
               RSMOE_ENGINE_PYTHON=str(engine_python()))
    cmd = [str(qgis_process), "run", ALG, "--", f"INPUT={DATA / 's2_crop512.tif'}", "TILE_SIZE=512",
           f"OUTPUT={out}"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_geojson(out, 1)
    assert _engine_processes() <= before, "qgis_process left its engine running"
