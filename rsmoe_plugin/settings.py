"""Engine settings: stored in QgsSettings, overridden by environment variables for headless use.

How the plugin reaches an engine, in order of precedence:

1. ``RSMOE_ENGINE_URL`` (+ ``RSMOE_ENGINE_TOKEN``): a running engine (``rsmoe serve``).
2. ``RSMOE_ENGINE_PYTHON``: an interpreter (or venv folder, or ``rsmoe`` executable) with the engine
   installed; the plugin starts ``rsmoe serve`` with it on demand.
3. The settings dialog's choice (QgsSettings ``rsmoe/engine/*``): *start* an engine from a Python
   interpreter / venv, or *connect* to a running one by URL + token or by its token file.
4. Nothing configured: the default token file of a running ``rsmoe serve``
   (``$RSMOE_HOME/engine.json`` or ``~/.cache/rsmoe/engine.json``), if an engine answers there.

``RSMOE_ENGINE_TOKEN_FILE``, ``RSMOE_ENGINE_MODEL``, ``RSMOE_ENGINE_BACKEND`` and
``RSMOE_ENGINE_DEVICE`` override the corresponding settings as well.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TypeVar

from qgis.core import QgsApplication, QgsSettings

SETTINGS_GROUP = "rsmoe/engine"
SETUP_GROUP = "rsmoe/setup"

MODE_START = "start"
MODE_CONNECT = "connect"

BACKENDS = ("auto", "torch", "onnx")

ENV_PYTHON = "RSMOE_ENGINE_PYTHON"
ENV_URL = "RSMOE_ENGINE_URL"
ENV_TOKEN = "RSMOE_ENGINE_TOKEN"
ENV_TOKEN_FILE = "RSMOE_ENGINE_TOKEN_FILE"
ENV_MODEL = "RSMOE_ENGINE_MODEL"
ENV_BACKEND = "RSMOE_ENGINE_BACKEND"
ENV_DEVICE = "RSMOE_ENGINE_DEVICE"

T = TypeVar("T")


def default_token_file() -> Path:
    """Where ``rsmoe serve`` writes its URL and token by default (mirrors engine.server)."""
    home = os.environ.get("RSMOE_HOME")
    root = Path(home).expanduser() if home else Path.home() / ".cache" / "rsmoe"
    return root / "engine.json"


@dataclass(frozen=True)
class EngineSettings:
    """Everything the plugin needs to find or start an engine.

    Parameters
    ----------
    mode
        ``start`` (the plugin runs ``rsmoe serve`` itself) or ``connect`` (an engine already runs).
    python
        For ``start``: a Python interpreter with the engine installed, a venv folder, or the
        venv's ``rsmoe`` executable.
    url, token
        For ``connect``: the engine's URL and token (empty URL: read both from ``token_file``).
    token_file
        For ``connect``: the engine's ``engine.json`` (empty: the engine's default location).
    model_dir, backend, device
        For ``start``: ``rsmoe serve --model/--backend/--device`` (empty model: the embedded one).
    startup_timeout_s
        How long to wait for a started engine to answer ``/health`` (model loading included).
    request_timeout_s
        How long one caption / question may take.
    """

    mode: str = MODE_START
    python: str = ""
    url: str = ""
    token: str = ""
    token_file: str = ""
    model_dir: str = ""
    backend: str = "auto"
    device: str = "auto"
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 900.0
    #: where each value came from, for messages ("environment" or "settings")
    source: str = "settings"

    def with_environment(self, environ: dict[str, str] | None = None) -> EngineSettings:
        """These settings with the ``RSMOE_ENGINE_*`` environment variables applied."""
        env = os.environ if environ is None else environ
        changes: dict[str, object] = {}
        if env.get(ENV_TOKEN_FILE):
            changes.update(token_file=env[ENV_TOKEN_FILE], mode=MODE_CONNECT, source="environment")
        if env.get(ENV_PYTHON):
            changes.update(python=env[ENV_PYTHON], mode=MODE_START, source="environment")
        if env.get(ENV_URL):
            changes.update(url=env[ENV_URL], token=env.get(ENV_TOKEN, self.token), mode=MODE_CONNECT,
                           source="environment")
        elif env.get(ENV_TOKEN):
            changes.update(token=env[ENV_TOKEN])
        for key, name in ((ENV_MODEL, "model_dir"), (ENV_BACKEND, "backend"), (ENV_DEVICE, "device")):
            if env.get(key):
                changes[name] = env[key]
        return replace(self, **changes) if changes else self

    @property
    def token_file_path(self) -> Path:
        return Path(self.token_file).expanduser() if self.token_file else default_token_file()


def _coerce(value: object, default: object) -> object:
    if isinstance(default, bool):  # QgsSettings may give back "true" / "false"
        return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1", "yes")
    if isinstance(default, float):
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return default
    return "" if value is None else str(value)


def _load(group: str, cls: type[T]) -> T:
    """A settings dataclass from QgsSettings ``group`` (missing or unreadable values: the defaults)."""
    qs = QgsSettings()
    defaults = cls()
    values = {f.name: _coerce(qs.value(f"{group}/{f.name}", getattr(defaults, f.name)), getattr(defaults, f.name))
              for f in fields(cls) if f.name != "source"}
    return cls(**values)


def _save(group: str, settings: object) -> None:
    qs = QgsSettings()
    for f in fields(settings):
        if f.name != "source":
            qs.setValue(f"{group}/{f.name}", getattr(settings, f.name))


def load_settings(apply_environment: bool = True) -> EngineSettings:
    """The stored settings (QgsSettings), with the environment overrides unless told otherwise."""
    settings = _load(SETTINGS_GROUP, EngineSettings)
    if settings.mode not in (MODE_START, MODE_CONNECT):
        settings = replace(settings, mode=MODE_START)
    return settings.with_environment() if apply_environment else settings


def save_settings(settings: EngineSettings) -> None:
    """Store settings in QgsSettings (the environment overrides are not stored)."""
    _save(SETTINGS_GROUP, settings)


@dataclass(frozen=True)
class SetupChoices:
    """The engine set-up dialog's last choices (see :class:`rsmoe_plugin.engine_setup.SetupOptions`);
    empty ``base_python`` / ``wheel`` / ``root``: found automatically, the bundled wheel, the profile's folder."""

    base_python: str = ""
    torch_build: str = "auto"
    use_pytorch_index: bool = True
    index_url: str = ""
    extra_pip_args: str = ""
    export_onnx: bool = True
    wheel: str = ""
    root: str = ""


def load_setup_choices() -> SetupChoices:
    return _load(SETUP_GROUP, SetupChoices)


def save_setup_choices(choices: SetupChoices) -> None:
    _save(SETUP_GROUP, choices)


def default_setup_root() -> Path:
    """Where "Set up the engine" puts the engine's environment: the QGIS profile's ``rsmoe`` folder."""
    return Path(QgsApplication.qgisSettingsDirPath()) / "rsmoe"
