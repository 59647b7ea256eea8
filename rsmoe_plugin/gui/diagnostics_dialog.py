"""Plugins > RS-MoE > Diagnostics: the report of :mod:`rsmoe_plugin.diagnostics`, to copy or save."""
from __future__ import annotations

from pathlib import Path

from qgis.PyQt.QtGui import QFontDatabase
from qgis.PyQt.QtWidgets import (
    QApplication,
    QDialog,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from rsmoe_plugin.diagnostics import gather
from rsmoe_plugin.engine_manager import get_manager
from rsmoe_plugin.tasks import EngineTask, TaskOutcome, start_task


class DiagnosticsDialog(QDialog):
    """Gathers the report in a QgsTask (probing the engine's Python takes seconds) and shows it."""

    def __init__(self, setup_root: Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("RS-MoE diagnostics")
        self.resize(820, 560)
        layout = QVBoxLayout(self)
        self.note = QLabel("Collecting\u2026 (asks the engine's Python which packages and GPUs it sees)", self)
        self.note.setWordWrap(True)
        layout.addWidget(self.note)
        self.text = QPlainTextEdit(self)
        self.text.setReadOnly(True)
        self.text.setFont(QFontDatabase.systemFont(QFontDatabase.FixedFont))
        layout.addWidget(self.text)
        row = QHBoxLayout()
        self.copy_button = QPushButton("Copy", self)
        self.copy_button.clicked.connect(self.copy)
        self.save_button = QPushButton("Save\u2026", self)
        self.save_button.clicked.connect(self._save_as)
        refresh = QPushButton("Refresh", self)
        refresh.clicked.connect(self.refresh)
        close = QPushButton("Close", self)
        close.clicked.connect(self.reject)
        for button in (self.copy_button, self.save_button, refresh):
            row.addWidget(button)
        row.addStretch(1)
        row.addWidget(close)
        layout.addLayout(row)
        self.setup_root = setup_root
        self.task: EngineTask | None = None
        self.refresh()

    def refresh(self) -> EngineTask:
        """Gather the report again (in a QgsTask)."""
        self.copy_button.setEnabled(False)
        self.save_button.setEnabled(False)
        manager, root = get_manager(), self.setup_root
        self.task = start_task(EngineTask("RS-MoE: diagnostics", lambda _task: gather(manager, root), self._done))
        return self.task

    def _done(self, outcome: TaskOutcome) -> None:
        if outcome.ok:
            self.text.setPlainText(outcome.result)
            self.note.setText("Copy this report into a bug report (it holds no token).")
            self.copy_button.setEnabled(True)
            self.save_button.setEnabled(True)
        else:
            self.note.setText(f"Could not collect the report: {outcome.error or 'cancelled'}")

    def report(self) -> str:
        return self.text.toPlainText()

    def copy(self) -> None:
        QApplication.clipboard().setText(self.report())

    def save(self, path: Path) -> None:
        path.write_text(self.report(), encoding="utf-8")

    def _save_as(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save the diagnostics report", "rsmoe-diagnostics.txt",
                                              "Text (*.txt)")
        if path:
            self.save(Path(path))
