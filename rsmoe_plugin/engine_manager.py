"""Start, watch, restart and stop the engine process (``rsmoe serve``), or connect to a running one.

One :class:`EngineManager` per QGIS process (:func:`get_manager`), shared by the GUI actions and the
Processing provider. It is thread-safe: QgsTasks and Processing threads call :meth:`EngineManager.call`,
which starts the engine on first use (in the calling worker thread, so QGIS never freezes),
restarts it when the process has died, and turns a connection lost mid-request into an
:class:`~rsmoe_plugin.errors.EngineDiedError` with the exit code and the last lines of its log.
The process is stopped when the plugin unloads (QGIS closes) and, as a last resort, at exit.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from qgis.core import Qgis, QgsMessageLog
from qgis.PyQt.QtCore import QObject, pyqtSignal

from rsmoe_plugin.client import EngineClient, EngineHealth
from rsmoe_plugin.engine_env import clean_environment, interpreter_of, tail_lines
from rsmoe_plugin.errors import (
    ConfigurationError,
    EngineConnectionLost,
    EngineDiedError,
    EngineError,
    EngineStartError,
    EngineTimeoutError,
    EngineUnreachableError,
)
from rsmoe_plugin.settings import MODE_CONNECT, EngineSettings, load_settings

LOG_TAG = "RS-MoE"
T = TypeVar("T")

STATE_STOPPED = "stopped"
STATE_STARTING = "starting"
STATE_RUNNING = "running"
STATE_CONNECTED = "connected"
STATE_DIED = "died"
STATE_FAILED = "failed"

def log(message: str, level: Qgis.MessageLevel = Qgis.Info) -> None:
    QgsMessageLog.logMessage(message, LOG_TAG, level)


@dataclass(frozen=True)
class EngineStatus:
    """What the panels show about the engine."""

    state: str
    message: str = ""
    health: EngineHealth | None = None
    url: str | None = None
    pid: int | None = None
    started_by_plugin: bool = False
    log_path: str | None = None

    def summary(self) -> str:
        if self.health is not None and self.state in (STATE_RUNNING, STATE_CONNECTED):
            how = "started by the plugin" if self.started_by_plugin else "external"
            return f"Engine {self.state} ({how}): {self.health.summary()}"
        return f"Engine {self.state}" + (f": {self.message}" if self.message else "")


def engine_command(python: str, token_file: Path, settings: EngineSettings) -> list[str]:
    """The command line that runs ``rsmoe serve`` with the configured interpreter.

    ``python`` is an interpreter (``.../bin/python``), a venv folder, or an ``rsmoe`` executable.
    """
    path = Path(python).expanduser()
    if path.is_dir():
        found = interpreter_of(python)
        if found is None:
            raise EngineStartError(f"'{python}' is a folder without bin/python: give the Python interpreter of the "
                                   f"venv where the RS-MoE engine is installed")
        path = found
    if path.name.lower().startswith("rsmoe"):
        cmd = [str(path), "serve"]
    else:
        cmd = [str(path), "-m", "engine.cli", "serve"]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--token-file", str(token_file), "--stop-on-stdin-eof"]
    if settings.model_dir:
        cmd += ["--model", str(Path(settings.model_dir).expanduser())]
    if settings.backend:
        cmd += ["--backend", settings.backend]
    if settings.device:
        cmd += ["--device", settings.device]
    return cmd


def _close_stdin(proc: subprocess.Popen) -> None:
    """Close our end of the engine's stdin pipe (``--stop-on-stdin-eof``: the engine stops when it closes,
    which the OS also does if QGIS crashes)."""
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _start_hint(log_text: str) -> str:
    if "No module named" in log_text and "engine" in log_text:
        return (" The interpreter has no RS-MoE engine installed: choose the venv where it is installed "
                "(e.g. the repository's .venv/bin/python).")
    if "base weights" in log_text.lower():
        return " The engine's base weights are missing: run `rsmoe base-models` in its venv."
    return ""


class EngineManager(QObject):
    """The engine this QGIS process uses (see the module docstring)."""

    statusChanged = pyqtSignal(object)  # EngineStatus; emitted from any thread, delivered queued

    def __init__(self, settings_loader: Callable[[], EngineSettings] = load_settings) -> None:
        super().__init__()
        self._settings_loader = settings_loader
        self._lock = threading.RLock()
        self._process: subprocess.Popen | None = None
        self._client: EngineClient | None = None
        self._health: EngineHealth | None = None
        self._workdir: Path | None = None
        self._log_path: Path | None = None
        self._log_file = None
        self._config: tuple | None = None
        self._status = EngineStatus(STATE_STOPPED)
        self.starts = 0
        atexit.register(self.stop)

    # -- public API --------------------------------------------------------------------------
    @property
    def status(self) -> EngineStatus:
        return self._status

    @property
    def process_id(self) -> int | None:
        proc = self._process
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def token(self) -> str:
        """The token of the engine in use ('' when none): to keep it out of reports, never to show it."""
        client = self._client
        return client.token if client is not None else ""

    def settings(self) -> EngineSettings:
        return self._settings_loader()

    def ensure(self) -> EngineClient:
        """A client for a healthy engine: connects, starts, or restarts one as configured.

        Blocks while an engine starts (model loading takes tens of seconds): call it from a
        QgsTask or a Processing algorithm, never from the GUI thread.
        """
        settings = self._settings_loader()
        with self._lock:
            config = self._config_of(settings)
            if self._config is not None and config != self._config:
                log("engine settings changed: stopping the current engine")
                self._stop_locked()
            self._config = config
            if settings.mode == MODE_CONNECT:
                return self._connect(settings)
            if not settings.python:
                client = self._try_token_file(settings.token_file_path)
                if client is not None:
                    return client
                raise ConfigurationError(
                    "No RS-MoE engine is configured. Open Plugins > RS-MoE > Set up the engine to install it "
                    "(one click), or Engine settings to choose the Python interpreter (or venv) where it is "
                    "installed or to connect to a running `rsmoe serve`; headless: set RSMOE_ENGINE_PYTHON, or "
                    "RSMOE_ENGINE_URL and RSMOE_ENGINE_TOKEN.")
            proc = self._process
            if proc is not None and proc.poll() is None and self._client is not None:
                try:
                    self._health = self._client.health()
                    return self._client
                except EngineTimeoutError:
                    raise EngineTimeoutError("the engine process runs but does not answer /health; it may be "
                                             "overloaded. Try again, or restart QGIS.") from None
                except EngineError:
                    if proc.poll() is None:
                        raise
            if proc is not None and proc.poll() is not None:
                code = proc.returncode
                log(f"the engine had stopped ({_exit_description(code)}); restarting it", Qgis.Warning)
            return self._start(settings)

    def call(self, work: Callable[[EngineClient], T], what: str = "the request") -> T:
        """Run ``work(client)`` against a healthy engine; a dead engine gives :class:`EngineDiedError`."""
        client = self.ensure()
        try:
            return work(client)
        except (EngineConnectionLost, EngineUnreachableError, EngineTimeoutError) as exc:
            died = self._died_message(what)
            if died is not None:
                raise EngineDiedError(died) from None
            raise exc

    def health(self) -> EngineHealth:
        """``/health`` of the engine (starting it if needed)."""
        return self.call(lambda c: c.health(), "the health check")

    def stop(self) -> None:
        """Stop an engine this plugin started (an external engine is left running)."""
        with self._lock:
            self._stop_locked()
            self._config = None

    # -- internals ---------------------------------------------------------------------------
    @staticmethod
    def _config_of(settings: EngineSettings) -> tuple:
        return (settings.mode, settings.python, settings.url, settings.token, settings.token_file,
                settings.model_dir, settings.backend, settings.device)

    def _set_status(self, status: EngineStatus) -> None:
        self._status = status
        try:
            self.statusChanged.emit(status)
        except RuntimeError:  # the QObject is gone (interpreter shutdown)
            pass

    def _connect(self, settings: EngineSettings) -> EngineClient:
        if settings.url:
            if not settings.token:
                raise ConfigurationError(f"the engine URL {settings.url} is set but no token: set it in the RS-MoE "
                                         f"settings or RSMOE_ENGINE_TOKEN (it is in the engine's engine.json)")
            client = EngineClient(settings.url, settings.token, settings.request_timeout_s)
            where = settings.url
        else:
            client = self._client_from_token_file(settings.token_file_path, settings.request_timeout_s)
            where = f"{client.url} (from {settings.token_file_path})"
        try:
            self._health = client.health()
        except EngineUnreachableError as exc:
            self._set_status(EngineStatus(STATE_FAILED, str(exc), url=client.url))
            raise EngineUnreachableError(f"no RS-MoE engine answers at {where}: start it with `rsmoe serve` "
                                         f"or check the URL in the RS-MoE settings ({exc})") from None
        self._client = client
        self._set_status(EngineStatus(STATE_CONNECTED, health=self._health, url=client.url, pid=self._health.pid))
        return client

    @staticmethod
    def _client_from_token_file(path: Path, timeout: float) -> EngineClient:
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            return EngineClient(str(info["url"]), str(info["token"]), timeout)
        except FileNotFoundError:
            raise ConfigurationError(f"no running engine: its token file {path} does not exist "
                                     f"(start one with `rsmoe serve`)") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(f"cannot read the engine's token file {path}: {exc}") from None

    def _try_token_file(self, path: Path) -> EngineClient | None:
        if not path.is_file():
            return None
        try:
            client = self._client_from_token_file(path, self._settings_loader().request_timeout_s)
            self._health = client.health(timeout=3.0)
        except EngineError:
            return None
        log(f"using the running engine of {path} at {client.url}")
        self._client = client
        self._set_status(EngineStatus(STATE_CONNECTED, health=self._health, url=client.url, pid=self._health.pid))
        return client

    def _start(self, settings: EngineSettings) -> EngineClient:
        self._stop_locked(quiet=True)
        self._workdir = Path(tempfile.mkdtemp(prefix="rsmoe-engine-"))
        token_file = self._workdir / "engine.json"
        self._log_path = self._workdir / "engine.log"
        cmd = engine_command(settings.python, token_file, settings)
        env = clean_environment()
        log(f"starting the engine: {' '.join(cmd)}")
        self._set_status(EngineStatus(STATE_STARTING, "loading the model", log_path=str(self._log_path),
                                      started_by_plugin=True))
        self._log_file = open(self._log_path, "wb")  # noqa: SIM115 - closed in _stop_locked
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0) | getattr(
                subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        else:
            kwargs["start_new_session"] = True
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._log_file, stderr=subprocess.STDOUT,
                                    env=env, cwd=str(self._workdir), **kwargs)
        except OSError as exc:
            self._stop_locked(quiet=True)
            message = (f"cannot run '{cmd[0]}' ({exc.strerror or exc}): set the Python interpreter of the venv "
                       f"where the RS-MoE engine is installed (e.g. .venv/bin/python) in the RS-MoE settings "
                       f"or RSMOE_ENGINE_PYTHON")
            self._set_status(EngineStatus(STATE_FAILED, message))
            raise EngineStartError(message) from None
        self._process = proc
        self.starts += 1
        deadline = time.monotonic() + settings.startup_timeout_s
        client: EngineClient | None = None
        while True:
            code = proc.poll()
            if code is not None:
                tail = tail_lines(self._log_path, 6)
                message = (f"the engine exited while starting ({_exit_description(code)}).{_start_hint(tail)}"
                           + (f"\nLast lines of its log:\n{tail}" if tail else ""))
                self._set_status(EngineStatus(STATE_FAILED, message, log_path=str(self._log_path)))
                self._process = None
                _close_stdin(proc)
                raise EngineStartError(message)
            if client is None and token_file.is_file():
                try:
                    info = json.loads(token_file.read_text(encoding="utf-8"))
                    client = EngineClient(str(info["url"]), str(info["token"]), settings.request_timeout_s)
                except (OSError, ValueError, KeyError):
                    client = None
            if client is not None:
                try:
                    self._health = client.health(timeout=5.0)
                    break
                except EngineError:
                    pass
            if time.monotonic() > deadline:
                self._stop_locked(quiet=True)
                message = (f"the engine did not become ready within {settings.startup_timeout_s:.0f} s "
                           f"(see its log {self._log_path})")
                self._set_status(EngineStatus(STATE_FAILED, message))
                raise EngineStartError(message)
            time.sleep(0.25)
        self._client = client
        log(f"engine ready at {client.url} (pid {proc.pid}): {self._health.summary()}", Qgis.Success)
        self._set_status(EngineStatus(STATE_RUNNING, health=self._health, url=client.url, pid=proc.pid,
                                      started_by_plugin=True, log_path=str(self._log_path)))
        return client

    def _died_message(self, what: str) -> str | None:
        """If the process this plugin started has exited, say so (and mark it for restart)."""
        with self._lock:
            proc = self._process
            if proc is None:
                return None
            try:
                code = proc.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                return None
            tail = tail_lines(self._log_path, 3)
            message = (f"The RS-MoE engine stopped while working on {what} ({_exit_description(code)}). "
                       f"It will be restarted with the next request."
                       + (f" Last lines of its log ({self._log_path}):\n{tail}" if tail else ""))
            log(message, Qgis.Critical)
            self._client = None
            self._set_status(EngineStatus(STATE_DIED, message, log_path=str(self._log_path)))
            return message

    def _stop_locked(self, quiet: bool = False) -> None:
        proc, self._process = self._process, None
        if proc is not None and proc.poll() is None:
            if not quiet:
                log(f"stopping the engine (pid {proc.pid})")
            try:
                proc.terminate()
                proc.wait(timeout=15.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5.0)
            except OSError:
                pass
        if proc is not None:
            _close_stdin(proc)
        if self._log_file is not None:
            try:
                self._log_file.close()
            except OSError:
                pass
            self._log_file = None
        if self._workdir is not None:  # the token file and the log of the previous engine
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._client = None
        self._health = None
        if proc is not None or self._status.state == STATE_CONNECTED:
            self._set_status(EngineStatus(STATE_STOPPED))


_MANAGER: EngineManager | None = None
_MANAGER_LOCK = threading.Lock()


def get_manager() -> EngineManager:
    """The engine manager of this QGIS process (created on first use, in the calling thread)."""
    global _MANAGER
    with _MANAGER_LOCK:
        if _MANAGER is None:
            _MANAGER = EngineManager()
        return _MANAGER


def shutdown_manager() -> None:
    """Stop the engine (if this plugin started it) and forget the manager."""
    global _MANAGER
    with _MANAGER_LOCK:
        manager, _MANAGER = _MANAGER, None
    if manager is not None:
        manager.stop()
        try:
            atexit.unregister(manager.stop)
        except Exception:  # pragma: no cover
            pass


__all__ = ["EngineManager", "EngineStatus", "engine_command", "get_manager", "shutdown_manager"]
