"""The "RS-MoE caption" panel: region and style choice, the caption with each expert's part, and a note
when the model says it is unsure (``uncertain``: e.g. the scene head below its threshold, or imagery
finer or coarser than the model was trained on)."""
from __future__ import annotations

from qgis.gui import QgsDockWidget
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtWidgets import QComboBox, QHBoxLayout, QLabel, QPushButton, QTextBrowser, QVBoxLayout, QWidget

from rsmoe_plugin.client import ModelAnswer
from rsmoe_plugin.engine_manager import EngineStatus
from rsmoe_plugin.gui.common import REGION_CHOICES, engine_status_html, esc, uncertainty_html
from rsmoe_plugin.regions import RegionRequest

SEPARATOR = " \u00b7 "
STYLE_CHOICES = (("Concise", "concise"), ("Detailed (every expert)", "detailed"))


class CaptionPanel(QgsDockWidget):
    """Shows the latest caption; its button triggers the plugin's "Caption this layer"."""

    captionRequested = pyqtSignal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("RS-MoE caption", parent)
        self.setObjectName("RSMoECaptionPanel")
        body = QWidget(self)
        layout = QVBoxLayout(body)
        row = QHBoxLayout()
        self.region_combo = QComboBox(body)
        for label, value in REGION_CHOICES:
            self.region_combo.addItem(label, value)
        self.style_combo = QComboBox(body)
        for label, value in STYLE_CHOICES:
            self.style_combo.addItem(label, value)
        self.caption_button = QPushButton("Caption this layer", body)
        self.caption_button.clicked.connect(self.captionRequested.emit)
        row.addWidget(QLabel("Region:", body))
        row.addWidget(self.region_combo)
        row.addWidget(QLabel("Style:", body))
        row.addWidget(self.style_combo)
        row.addStretch(1)
        row.addWidget(self.caption_button)
        layout.addLayout(row)
        self.status_label = QLabel("Select a raster layer and press \u201cCaption this layer\u201d.", body)
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        self.result_view = QTextBrowser(body)
        self.result_view.setOpenExternalLinks(False)
        layout.addWidget(self.result_view, 1)
        self.engine_label = QLabel(body)
        self.engine_label.setWordWrap(True)
        self.engine_label.setTextFormat(Qt.RichText)
        layout.addWidget(self.engine_label)
        self.setWidget(body)
        self.last_answer: ModelAnswer | None = None

    # -- choices -----------------------------------------------------------------------------
    def region_mode(self) -> str:
        return str(self.region_combo.currentData())

    def set_region_mode(self, mode: str) -> None:
        self.region_combo.setCurrentIndex(max(0, self.region_combo.findData(mode)))

    def style(self) -> str:
        return str(self.style_combo.currentData())

    def set_style(self, style: str) -> None:
        self.style_combo.setCurrentIndex(max(0, self.style_combo.findData(style)))

    # -- states ------------------------------------------------------------------------------
    def set_busy(self, message: str) -> None:
        self.caption_button.setEnabled(False)
        self.status_label.setText(message)

    def show_error(self, message: str) -> None:
        self.caption_button.setEnabled(True)
        self.status_label.setText(f'<span style="color:#c62828"><b>Failed:</b> {esc(message)}</span>')

    def show_caption(self, region: RegionRequest, answer: ModelAnswer) -> None:
        self.caption_button.setEnabled(True)
        self.last_answer = answer
        cached = ", visual features from the engine's cache" if answer.cached else ""
        note = answer.uncertainty_note()
        unsure = f' <span style="color:#b26a00"><b>{esc(note)}</b></span>' if note else ""
        self.status_label.setText(f"Captioned in {answer.seconds:.1f} s{cached}.{unsure}")
        parts = [f"<h3>{esc(region.layer_name)}</h3>",
                 f"<p><small>{esc(region.describe(with_name=False))}</small></p>",
                 f'<p style="font-size:13pt">{esc(answer.text)}</p>']
        if note:
            parts.append(uncertainty_html(answer))
        if answer.segments:
            parts.append("<h4>Experts</h4><table cellspacing='4'>")
            for seg in answer.segments:
                text = " ".join(seg.text.split())
                parts.append(f"<tr><td valign='top'><b>{esc(seg.expert)}</b></td><td>{esc(text)}</td></tr>")
            parts.append("</table>")
        facts = [f"router: {answer.router or '-'}", scene_fact(answer),
                 f"experts: {', '.join(answer.experts) or '-'}"]
        if answer.model_resolution_m is not None:
            facts.append(f"seen at {answer.model_resolution_m:g} m/px")
        parts.append(f"<p><small>{esc(SEPARATOR.join(facts))}</small></p>")
        self.result_view.setHtml("".join(parts))

    def show_engine_status(self, status: EngineStatus) -> None:
        self.engine_label.setText(engine_status_html(status))


def scene_fact(answer: ModelAnswer) -> str:
    """``scene: harbor (0.93)``; ``scene: unsure (0.41)`` where the model named none below its threshold."""
    if answer.scene_confidence is None:
        return f"scene: {answer.scene or '-'}"
    return f"scene: {answer.scene or 'unsure'} ({answer.scene_confidence:.2f})"
