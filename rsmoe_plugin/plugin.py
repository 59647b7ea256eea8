"""The plugin object QGIS loads: actions, toolbar, panels, the Processing provider, the engine."""
from __future__ import annotations

from qgis.core import Qgis, QgsApplication, QgsRasterLayer
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from rsmoe_plugin.client import ModelAnswer
from rsmoe_plugin.engine_manager import EngineStatus, get_manager, log, shutdown_manager
from rsmoe_plugin.errors import PluginError
from rsmoe_plugin.gui.common import error_text, push_error, push_message, region_from_canvas
from rsmoe_plugin.regions import RegionRequest
from rsmoe_plugin.resources import icon_path
from rsmoe_plugin.tasks import EngineTask, TaskOutcome, running_tasks, start_task

MENU = "&RS-MoE"
ALGORITHM_ID = "rsmoe:annotatetiles"


class RSMoEPlugin:
    """``classFactory`` returns one of these. ``iface`` is None under ``qgis_process``."""

    def __init__(self, iface) -> None:  # noqa: ANN001 - QgisInterface
        self.iface = iface
        self.provider = None
        self.actions: list[QAction] = []
        self.toolbar = None
        self.caption_panel = None
        self.ask_dock = None
        self.last_caption_task: EngineTask | None = None
        self.setup_dialog = None
        self.diagnostics_dialog = None

    # -- Processing (also under qgis_process, without a GUI) ------------------------------------
    def initProcessing(self) -> None:  # noqa: N802 - QGIS calls this name
        from rsmoe_plugin.processing_provider.provider import RSMoEProvider

        if self.provider is None:
            self.provider = RSMoEProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    # -- GUI ---------------------------------------------------------------------------------
    def initGui(self) -> None:  # noqa: N802
        from rsmoe_plugin.gui.ask_dock import AskDock
        from rsmoe_plugin.gui.caption_panel import CaptionPanel

        self.initProcessing()
        manager = get_manager()
        window = self.iface.mainWindow()
        icon = QIcon(icon_path())
        self.toolbar = self.iface.addToolBar("RS-MoE")
        self.toolbar.setObjectName("RSMoEToolbar")

        self.caption_action = self._action(icon, "Caption this layer", self.caption_active_layer,
                                           "Describe the active raster layer (whole or visible extent)")
        self.ask_action = self._action(QgsApplication.getThemeIcon("/mActionHelpContents.svg"), "Ask a question",
                                       self.toggle_ask_dock, "Open the question panel for the active raster layer")
        self.ask_action.setCheckable(True)
        self.annotate_action = self._action(QgsApplication.getThemeIcon("/algorithms/mAlgorithmCreateGrid.svg"),
                                            "Annotate tiles\u2026", self.open_annotate_dialog,
                                            "Caption every tile of a raster into a GeoJSON layer (Processing)")
        self.settings_action = self._action(QgsApplication.getThemeIcon("/mActionOptions.svg"),
                                            "Engine settings\u2026", self.open_settings, toolbar=False)
        self.setup_action = self._action(QgsApplication.getThemeIcon("/mActionNewFolder.svg"),
                                         "Set up the engine\u2026", self.open_setup, toolbar=False)
        self.diagnostics_action = self._action(QgsApplication.getThemeIcon("/mActionPropertiesWidget.svg"),
                                               "Diagnostics\u2026", self.open_diagnostics, toolbar=False)
        self.restart_action = self._action(QgsApplication.getThemeIcon("/mActionReload.svg"), "Restart engine",
                                           self.restart_engine, toolbar=False)
        self.stop_action = self._action(QgsApplication.getThemeIcon("/mActionStop.svg"), "Stop engine",
                                        self.stop_engine, toolbar=False)

        self.caption_panel = CaptionPanel(window)
        self.caption_panel.captionRequested.connect(self.caption_active_layer)
        self.iface.addDockWidget(Qt.RightDockWidgetArea, self.caption_panel)
        self.caption_panel.hide()
        self.ask_dock = AskDock(self.iface, manager, window)
        self.iface.addDockWidget(Qt.RightDockWidgetArea, self.ask_dock)
        self.ask_dock.hide()
        self.ask_dock.visibilityChanged.connect(self.ask_action.setChecked)
        manager.statusChanged.connect(self._engine_status_changed)
        self._engine_status_changed(manager.status)

    def _action(self, icon: QIcon, text: str, slot, tip: str = "", toolbar: bool = True) -> QAction:  # noqa: ANN001
        action = QAction(icon, text, self.iface.mainWindow())
        action.setObjectName("rsmoe_" + "".join(ch for ch in text.lower() if ch.isalnum()))
        action.triggered.connect(lambda *_: slot())
        if tip:
            action.setStatusTip(tip)
            action.setToolTip(tip)
        self.iface.addPluginToMenu(MENU, action)
        if toolbar and self.toolbar is not None:
            self.toolbar.addAction(action)
        self.actions.append(action)
        return action

    def unload(self) -> None:
        """Remove everything this plugin added and stop the engine it started (QGIS closes)."""
        for task in running_tasks():
            task.cancel()
        if self.iface is not None:
            for action in self.actions:
                self.iface.removePluginMenu(MENU, action)
                self.iface.removeToolBarIcon(action)
            for dialog in (self.setup_dialog, self.diagnostics_dialog):
                if dialog is not None:
                    dialog.close()
                    dialog.deleteLater()
            for dock in (self.caption_panel, self.ask_dock):
                if dock is not None:
                    if hasattr(dock, "disconnect_signals"):
                        dock.disconnect_signals()
                    self.iface.removeDockWidget(dock)
                    dock.deleteLater()
            if self.toolbar is not None:
                self.toolbar.deleteLater()
        self.actions.clear()
        self.caption_panel = self.ask_dock = self.toolbar = None
        self.setup_dialog = self.diagnostics_dialog = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        shutdown_manager()

    # -- engine ------------------------------------------------------------------------------
    def _engine_status_changed(self, status: EngineStatus) -> None:
        for panel in (self.caption_panel, self.ask_dock):
            if panel is not None:
                panel.show_engine_status(status)

    def open_settings(self) -> None:
        from rsmoe_plugin.gui.settings_dialog import SettingsDialog

        dialog = SettingsDialog(self.iface.mainWindow())
        dialog.setupRequested.connect(self.open_setup)
        dialog.exec_()

    def open_setup(self):  # noqa: ANN201 - SetupDialog
        """Show the "Set up the engine" dialog (one per QGIS window; a running set-up goes on when it is closed)."""
        from rsmoe_plugin.gui.setup_dialog import SetupDialog

        if self.setup_dialog is None:
            self.setup_dialog = SetupDialog(self.iface, self.iface.mainWindow())
        self.setup_dialog.show()
        self.setup_dialog.raise_()
        return self.setup_dialog

    def open_diagnostics(self):  # noqa: ANN201 - DiagnosticsDialog
        """Show the diagnostics report (gathered again each time it is opened)."""
        from rsmoe_plugin.gui.diagnostics_dialog import DiagnosticsDialog
        from rsmoe_plugin.settings import default_setup_root

        if self.diagnostics_dialog is None:
            self.diagnostics_dialog = DiagnosticsDialog(default_setup_root(), self.iface.mainWindow())
        else:
            self.diagnostics_dialog.refresh()
        self.diagnostics_dialog.show()
        self.diagnostics_dialog.raise_()
        return self.diagnostics_dialog

    def restart_engine(self) -> EngineTask:
        manager = get_manager()

        def work(_task: EngineTask):
            manager.stop()
            return manager.health()

        def done(outcome: TaskOutcome) -> None:
            if outcome.error is not None:
                push_error(self.iface, outcome.error)
            elif outcome.ok:
                push_message(self.iface, "RS-MoE engine", outcome.result.summary(), Qgis.Success)

        return start_task(EngineTask("RS-MoE: restart the engine", work, done))

    def stop_engine(self) -> None:
        get_manager().stop()
        push_message(self.iface, "RS-MoE engine", "stopped; it starts again with the next request")

    # -- caption -----------------------------------------------------------------------------
    def caption_active_layer(self) -> EngineTask | None:
        """Caption the active raster layer (whole or visible extent, as the caption panel says)."""
        panel = self.caption_panel
        assert panel is not None
        panel.show()
        panel.raise_()
        try:
            region = region_from_canvas(self.iface, panel.region_mode())
        except PluginError as exc:
            title, message = error_text(exc)
            self.iface.messageBar().pushMessage(title, message, Qgis.Warning, 10)
            panel.show_error(message)
            return None
        style = panel.style()
        manager = get_manager()
        panel.set_busy(f"Captioning {region.describe()}\u2026 (the first request starts the engine)")

        def work(_task: EngineTask) -> ModelAnswer:
            body = region.body()
            return manager.call(lambda c: c.caption(body, style), "the caption")

        def finished(outcome: TaskOutcome) -> None:
            self._caption_finished(region, outcome)

        self.last_caption_task = start_task(EngineTask(f"RS-MoE: caption {region.layer_name}", work, finished))
        return self.last_caption_task

    def _caption_finished(self, region: RegionRequest, outcome: TaskOutcome) -> None:
        panel = self.caption_panel
        if outcome.error is not None:
            message = push_error(self.iface, outcome.error)
            if panel is not None:
                panel.show_error(message)
        elif outcome.cancelled:
            if panel is not None:
                panel.show_error("cancelled")
        else:
            answer: ModelAnswer = outcome.result
            if panel is not None:
                panel.show_caption(region, answer)
            note = answer.uncertainty_note()
            push_message(self.iface, f"RS-MoE: {region.layer_name}",
                         answer.text[:400] + (f" ({note})" if note else ""), Qgis.Success)
            log(f"caption of {region.describe()}: {answer.text}")

    # -- ask ---------------------------------------------------------------------------------
    def toggle_ask_dock(self) -> None:
        dock = self.ask_dock
        if dock is None:
            return
        if dock.isVisible():
            dock.hide()
        else:
            dock.show()
            dock.raise_()
            dock.refresh()

    # -- batch -------------------------------------------------------------------------------
    def open_annotate_dialog(self) -> None:
        import processing

        layer = self.iface.activeLayer()
        params = {"INPUT": layer.id()} if isinstance(layer, QgsRasterLayer) else {}
        processing.execAlgorithmDialog(ALGORITHM_ID, params)
