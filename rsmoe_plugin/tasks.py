"""One QgsTask per engine request: the work runs in a worker thread, the result comes back on the
main thread (``finished``), where the GUI is updated."""
from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qgis.core import Qgis, QgsApplication, QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from rsmoe_plugin.engine_manager import log

#: tasks in flight: Python must keep a reference until QGIS is done with them
_RUNNING: set[QgsTask] = set()


@dataclass
class TaskOutcome:
    """What a task produced: ``result``, or ``error``; ``cancelled`` when the user cancelled it."""

    result: Any = None
    error: BaseException | None = None
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.cancelled


class EngineTask(QgsTask):
    """Run ``work(task)`` in a worker thread; call ``on_finished(outcome)`` on the main thread.

    ``work`` may report what it is doing with :meth:`report` (``noted`` is delivered on the main thread)."""

    noted = pyqtSignal(str)

    def __init__(self, description: str, work: Callable[[EngineTask], Any],
                 on_finished: Callable[[TaskOutcome], None]) -> None:
        super().__init__(description, QgsTask.CanCancel)
        self._work = work
        self._on_finished = on_finished
        self.outcome: TaskOutcome | None = None

    def report(self, fraction: float, text: str) -> None:
        """From the worker thread: progress (0..1) and what is being done now."""
        self.setProgress(max(0.0, min(100.0, fraction * 100.0)))
        self.noted.emit(text)

    def run(self) -> bool:
        try:
            result = self._work(self)
        except Exception as exc:  # reported on the main thread
            from rsmoe_plugin.errors import PluginError

            if not isinstance(exc, PluginError):
                log(f"{self.description()} failed:\n{traceback.format_exc()}", Qgis.Critical)
            self.outcome = TaskOutcome(error=exc, cancelled=self.isCanceled())
            return False
        self.outcome = TaskOutcome(result=result, cancelled=self.isCanceled())
        return not self.isCanceled()

    def finished(self, result: bool) -> None:
        outcome = self.outcome or TaskOutcome(cancelled=True)
        if self.isCanceled():
            outcome.cancelled = True
        self.outcome = outcome
        try:
            self._on_finished(outcome)
        finally:
            _RUNNING.discard(self)


def start_task(task: EngineTask) -> EngineTask:
    """Hand a task to QGIS's task manager (and keep it alive until it finishes)."""
    _RUNNING.add(task)
    QgsApplication.taskManager().addTask(task)
    return task


def running_tasks() -> list[QgsTask]:
    return list(_RUNNING)
