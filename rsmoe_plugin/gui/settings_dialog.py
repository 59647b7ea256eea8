"""Engine settings: start an engine from a Python venv, or connect to a running one."""
from __future__ import annotations

import os

from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from rsmoe_plugin.settings import (
    BACKENDS,
    ENV_PYTHON,
    ENV_TOKEN,
    ENV_URL,
    MODE_CONNECT,
    MODE_START,
    EngineSettings,
    default_token_file,
    load_settings,
    save_settings,
)


class SettingsDialog(QDialog):
    """Edits the stored settings (QgsSettings); environment overrides are shown, not stored.

    "Set up the engine\u2026" closes it and asks the plugin (``setupRequested``) for the set-up dialog."""

    setupRequested = pyqtSignal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("RS-MoE engine settings")
        self.setMinimumWidth(560)
        stored = load_settings(apply_environment=False)
        layout = QVBoxLayout(self)

        self.start_radio = QRadioButton("Start the engine from a Python environment (on demand)", self)
        self.connect_radio = QRadioButton("Connect to a running engine (`rsmoe serve`)", self)
        group = QButtonGroup(self)
        group.addButton(self.start_radio)
        group.addButton(self.connect_radio)
        (self.connect_radio if stored.mode == MODE_CONNECT else self.start_radio).setChecked(True)

        start_box = QGroupBox("Start", self)
        start_form = QFormLayout(start_box)
        self.setup_button = QPushButton("Set up the engine\u2026", start_box)
        self.setup_button.setToolTip("Create the engine's own Python environment in the QGIS profile (torch, the "
                                     "engine, its base weights) and use it: no shell needed")
        self.setup_button.clicked.connect(self._request_setup)
        start_form.addRow("No engine yet?", self.setup_button)
        self.python_widget = QgsFileWidget(start_box)
        self.python_widget.setFilePath(stored.python)
        self.python_widget.setDialogTitle("Python interpreter (or rsmoe executable) of the engine's venv")
        start_form.addRow("Python / venv:", self.python_widget)
        self.model_widget = QgsFileWidget(start_box)
        self.model_widget.setStorageMode(QgsFileWidget.GetDirectory)
        self.model_widget.setFilePath(stored.model_dir)
        start_form.addRow("Model directory:", self.model_widget)
        self.backend_combo = QComboBox(start_box)
        self.backend_combo.addItems(list(BACKENDS))
        self.backend_combo.setCurrentText(stored.backend if stored.backend in BACKENDS else "auto")
        start_form.addRow("Backend:", self.backend_combo)
        self.device_edit = QLineEdit(stored.device, start_box)
        self.device_edit.setPlaceholderText("auto | cpu | cuda | cuda:1")
        start_form.addRow("Device:", self.device_edit)
        self.startup_spin = QDoubleSpinBox(start_box)
        self.startup_spin.setRange(10, 3600)
        self.startup_spin.setSuffix(" s")
        self.startup_spin.setValue(stored.startup_timeout_s)
        start_form.addRow("Start-up timeout:", self.startup_spin)

        connect_box = QGroupBox("Connect", self)
        connect_form = QFormLayout(connect_box)
        self.url_edit = QLineEdit(stored.url, connect_box)
        self.url_edit.setPlaceholderText("http://127.0.0.1:PORT (empty: read it from the token file)")
        connect_form.addRow("URL:", self.url_edit)
        self.token_edit = QLineEdit(stored.token, connect_box)
        self.token_edit.setEchoMode(QLineEdit.Password)
        connect_form.addRow("Token:", self.token_edit)
        self.token_file_widget = QgsFileWidget(connect_box)
        self.token_file_widget.setFilePath(stored.token_file)
        self.token_file_widget.lineEdit().setPlaceholderText(str(default_token_file()))
        connect_form.addRow("Token file:", self.token_file_widget)

        self.timeout_spin = QDoubleSpinBox(self)
        self.timeout_spin.setRange(10, 7200)
        self.timeout_spin.setSuffix(" s")
        self.timeout_spin.setValue(stored.request_timeout_s)

        layout.addWidget(self.start_radio)
        layout.addWidget(start_box)
        layout.addWidget(self.connect_radio)
        layout.addWidget(connect_box)
        form = QFormLayout()
        form.addRow("Request timeout:", self.timeout_spin)
        layout.addLayout(form)
        overrides = [name for name in (ENV_URL, ENV_TOKEN, ENV_PYTHON) if os.environ.get(name)]
        if overrides:
            note = QLabel(f"<i>Environment variables override these settings now: {', '.join(overrides)}</i>", self)
            note.setWordWrap(True)
            layout.addWidget(note)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel, self)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)

        def sync() -> None:
            start_box.setEnabled(self.start_radio.isChecked())
            connect_box.setEnabled(self.connect_radio.isChecked())

        self.start_radio.toggled.connect(sync)
        sync()

    def settings(self) -> EngineSettings:
        return EngineSettings(
            mode=MODE_CONNECT if self.connect_radio.isChecked() else MODE_START,
            python=self.python_widget.filePath().strip(), url=self.url_edit.text().strip(),
            token=self.token_edit.text().strip(), token_file=self.token_file_widget.filePath().strip(),
            model_dir=self.model_widget.filePath().strip(), backend=self.backend_combo.currentText(),
            device=self.device_edit.text().strip() or "auto", startup_timeout_s=self.startup_spin.value(),
            request_timeout_s=self.timeout_spin.value())

    def _request_setup(self) -> None:
        self.reject()
        self.setupRequested.emit()

    def accept(self) -> None:
        save_settings(self.settings())
        super().accept()
