"""The "Ask a question" panel: questions about the active layer (whole, or the visible extent) and
the answers so far for that layer and extent.

Every (layer, extent) has its own history. The region of a question is kept per request key, so a
follow-up question about the same layer and extent sends the identical request region and the
engine answers it from its visual feature cache.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qgis.core import Qgis
from qgis.gui import QgsDockWidget
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from rsmoe_plugin.client import ModelAnswer
from rsmoe_plugin.engine_manager import EngineManager, EngineStatus
from rsmoe_plugin.errors import PluginError
from rsmoe_plugin.gui.common import (
    REGION_CHOICES,
    engine_status_html,
    error_text,
    esc,
    push_message,
    region_from_canvas,
    uncertainty_html,
)
from rsmoe_plugin.regions import REGION_VISIBLE, RegionRequest
from rsmoe_plugin.tasks import EngineTask, TaskOutcome, start_task

MAX_REGIONS_KEPT = 32


@dataclass
class Exchange:
    """One question and what came back."""

    question: str
    answer: ModelAnswer | None = None
    error: str | None = None

    def html(self) -> str:
        q = f"<p><b>Q:</b> {esc(self.question)}</p>"
        if self.error is not None:
            return q + f'<p style="color:#c62828"><b>Error:</b> {esc(self.error)}</p>'
        if self.answer is None:
            return q + "<p><i>waiting for the engine\u2026</i></p>"
        a = self.answer
        if a.router == "answer_head":  # a closed question: the model's answer head, no expert decoded
            by = "answered by the answer head"
        else:
            by = "experts: " + (", ".join(s.expert for s in a.segments) or "-")
        cached = "; features from cache" if a.cached else ""
        return (q + f"<p><b>A:</b> {esc(' '.join(a.text.split()))}<br><small>{esc(by)}; "
                    f"{a.seconds:.1f} s{cached}</small></p>" + uncertainty_html(a))


class AskDock(QgsDockWidget):
    """Question box + answer history for the current layer and extent."""

    def __init__(self, iface, manager: EngineManager, parent: QWidget | None = None) -> None:  # noqa: ANN001
        super().__init__("RS-MoE: ask a question", parent)
        self.setObjectName("RSMoEAskDock")
        self.iface = iface
        self.manager = manager
        self.histories: dict[tuple, list[Exchange]] = {}
        self._regions: dict[tuple, RegionRequest] = {}
        self._current_key: tuple | None = None
        self.last_task: EngineTask | None = None

        body = QWidget(self)
        layout = QVBoxLayout(body)
        row = QHBoxLayout()
        row.addWidget(QLabel("Region:", body))
        self.region_combo = QComboBox(body)
        for label, value in REGION_CHOICES:
            self.region_combo.addItem(label, value)
        self.region_combo.currentIndexChanged.connect(self.refresh)
        row.addWidget(self.region_combo)
        row.addStretch(1)
        self.clear_button = QPushButton("Clear history", body)
        self.clear_button.clicked.connect(self.clear_history)
        row.addWidget(self.clear_button)
        layout.addLayout(row)
        self.layer_label = QLabel(body)
        self.layer_label.setWordWrap(True)
        layout.addWidget(self.layer_label)
        self.history_view = QTextBrowser(body)
        layout.addWidget(self.history_view, 1)
        ask_row = QHBoxLayout()
        self.question_edit = QLineEdit(body)
        self.question_edit.setPlaceholderText("e.g. How many tennis courts are there? Is this area urban or rural?")
        self.question_edit.setMaxLength(1000)
        self.question_edit.returnPressed.connect(self.ask)
        self.ask_button = QPushButton("Ask", body)
        self.ask_button.clicked.connect(self.ask)
        ask_row.addWidget(self.question_edit, 1)
        ask_row.addWidget(self.ask_button)
        layout.addLayout(ask_row)
        self.engine_label = QLabel(body)
        self.engine_label.setWordWrap(True)
        self.engine_label.setTextFormat(Qt.RichText)
        layout.addWidget(self.engine_label)
        self.setWidget(body)

        iface.currentLayerChanged.connect(self.refresh)
        iface.mapCanvas().extentsChanged.connect(self._extent_changed)
        self.show_engine_status(manager.status)
        self.refresh()

    # -- region and history ------------------------------------------------------------------
    def region_mode(self) -> str:
        return str(self.region_combo.currentData())

    def set_region_mode(self, mode: str) -> None:
        self.region_combo.setCurrentIndex(max(0, self.region_combo.findData(mode)))

    def _extent_changed(self) -> None:
        if self.region_mode() == REGION_VISIBLE and self.isVisible():
            self.refresh()

    def refresh(self, *_args: object) -> None:
        """Show the history of the active layer and region."""
        try:
            region = region_from_canvas(self.iface, self.region_mode(), prepare=False)
        except PluginError as exc:
            self._current_key = None
            self.layer_label.setText(f"<i>{esc(exc)}</i>")
            self.history_view.setHtml("")
            self.ask_button.setEnabled(False)
            return
        self._current_key = region.key
        self.layer_label.setText(f"<b>{esc(region.layer_name)}</b> \u2014 {esc(region.describe(with_name=False))}")
        self.ask_button.setEnabled(True)
        self._render_history()

    def current_history(self) -> list[Exchange]:
        return list(self.histories.get(self._current_key, [])) if self._current_key else []

    def _render_history(self) -> None:
        exchanges = self.histories.get(self._current_key, []) if self._current_key else []
        if not exchanges:
            self.history_view.setHtml("<p><i>No questions yet about this layer and extent.</i></p>")
            return
        self.history_view.setHtml("<hr>".join(e.html() for e in exchanges))
        bar = self.history_view.verticalScrollBar()
        bar.setValue(bar.maximum())

    def clear_history(self) -> None:
        if self._current_key is not None:
            self.histories.pop(self._current_key, None)
        self._render_history()

    def _region_for_question(self) -> RegionRequest:
        region = region_from_canvas(self.iface, self.region_mode())
        kept = self._regions.get(region.key)
        if kept is not None:
            return kept  # the same request body as before: the engine's feature cache answers
        if len(self._regions) >= MAX_REGIONS_KEPT:
            self._regions.pop(next(iter(self._regions)))
        self._regions[region.key] = region
        return region

    # -- asking ------------------------------------------------------------------------------
    def ask(self, question: str | None = None,
            on_done: Callable[[TaskOutcome], None] | None = None) -> EngineTask | None:
        """Ask about the active layer / region (the text box's question unless ``question`` is given)."""
        text = (question if isinstance(question, str) else self.question_edit.text()).strip()
        if not text:
            push_message(self.iface, "RS-MoE", "Type a question first.", Qgis.Warning)
            return None
        try:
            region = self._region_for_question()
        except PluginError as exc:
            title, message = error_text(exc)
            self.iface.messageBar().pushMessage(title, message, Qgis.Warning, 8)
            return None
        key = region.key
        exchange = Exchange(text)
        self.histories.setdefault(key, []).append(exchange)
        self._current_key = key
        self.question_edit.clear()
        self._render_history()
        manager = self.manager

        def work(_task: EngineTask) -> ModelAnswer:
            body = region.body()
            return manager.call(lambda c: c.ask(body, text), "the question")

        def finished(outcome: TaskOutcome) -> None:
            if outcome.error is not None:
                title, message = error_text(outcome.error)
                exchange.error = message
                self.iface.messageBar().pushMessage(title, message, Qgis.Critical, 0)
            elif outcome.cancelled:
                exchange.error = "cancelled"
            else:
                exchange.answer = outcome.result
                note = outcome.result.uncertainty_note()
                push_message(self.iface, "RS-MoE answer",
                             outcome.result.text[:300] + (f" ({note})" if note else ""), Qgis.Success)
            if self._current_key == key:
                self._render_history()
            if on_done is not None:
                on_done(outcome)

        self.last_task = start_task(EngineTask(f"RS-MoE: question about {region.layer_name}", work, finished))
        return self.last_task

    def show_engine_status(self, status: EngineStatus) -> None:
        self.engine_label.setText(engine_status_html(status))

    def disconnect_signals(self) -> None:
        for signal, slot in ((self.iface.currentLayerChanged, self.refresh),
                             (self.iface.mapCanvas().extentsChanged, self._extent_changed)):
            try:
                signal.disconnect(slot)
            except (TypeError, RuntimeError):
                pass
