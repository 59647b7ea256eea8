"""Plugins > RS-MoE > Diagnostics: one text to paste into a bug report.

QGIS, plugin and engine versions, the engine's Python and packages (torch, ONNX Runtime and its providers),
the CUDA devices seen (``nvidia-smi`` and torch) and whether the engine uses one, the model, the engine's
state and the last lines of its log and of the set-up log. Tokens and credentials in URLs are removed
(:func:`rsmoe_plugin.engine_env.redact`); the engine's token is never asked for.

:func:`gather` probes the engine interpreter (a subprocess that imports torch): run it in a QgsTask.
"""
from __future__ import annotations

import configparser
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qgis.core import Qgis
from qgis.PyQt.QtCore import QT_VERSION_STR

from rsmoe_plugin.engine_env import EngineProbe, GpuInfo, detect_gpu, probe_engine, redact, tail_lines
from rsmoe_plugin.engine_manager import EngineManager, EngineStatus
from rsmoe_plugin.engine_setup import LOG_FILE, STATE_FILE, VENV_DIR, read_state
from rsmoe_plugin.resources import PLUGIN_DIR
from rsmoe_plugin.settings import MODE_CONNECT, EngineSettings

LOG_LINES = 20
SETUP_LOG_LINES = 8


def plugin_version(plugin_dir: Path = Path(PLUGIN_DIR)) -> str:
    """The version in the plugin's ``metadata.txt`` (beside the package once installed from the zip; in a
    source checkout, at the repository root)."""
    for path in (plugin_dir / "metadata.txt", plugin_dir.parent / "metadata.txt"):
        meta = configparser.ConfigParser(interpolation=None)
        try:
            if meta.read(path, encoding="utf-8"):
                return meta.get("general", "version", fallback="unknown")
        except configparser.Error:
            continue
    return "unknown"


@dataclass(frozen=True)
class Facts:
    """What the report is made of (gathered by :func:`gather`)."""

    settings: EngineSettings
    status: EngineStatus
    probe: EngineProbe | None
    gpu: GpuInfo
    setup_root: Path
    secrets: tuple[str, ...]


def _probe_lines(probe: EngineProbe | None, settings: EngineSettings) -> list[str]:
    if probe is None:
        how = "an external engine (connect mode)" if settings.mode == MODE_CONNECT else "none configured"
        return [f"Engine Python: {how}: not probed"]
    if probe.error:
        return [f"Engine Python: {probe.python}: {probe.error}"]
    data = probe.data
    packages = ", ".join(f"{k} {v}" for k, v in sorted(data.get("packages", {}).items())) or "none found"
    providers = data.get("onnxruntime_providers")
    devices = data.get("cuda_devices") or []
    lines = [f"Engine Python: {data.get('executable', probe.python)} (Python {data.get('python', '?')}, "
             f"{data.get('platform', '?')})",
             f"Engine packages: {packages}",
             f"ONNX Runtime providers: {', '.join(providers) if providers else 'onnxruntime not installed'}",
             f"torch CUDA: build {data.get('torch_cuda_build') or 'CPU only'}, available: "
             f"{'yes' if data.get('cuda_available') else 'no'}, devices: {', '.join(devices) or 'none'}"]
    if data.get("errors"):
        lines.append(f"Engine problems: {'; '.join(data['errors'])}")
    return lines


def _engine_lines(status: EngineStatus) -> list[str]:
    lines = [f"Engine state: {status.summary()}"]
    if status.pid or status.url:
        lines.append(f"Engine process: pid {status.pid or '?'}, {status.url or 'no URL'}")
    health = status.health
    if health is None:
        lines.append("Engine health: not known (the engine is not running; it starts with the first request)")
        return lines
    raw = health.raw
    lines += [f"Engine version: {health.version}",
              f"Model: {health.model_id} (variant {health.variant}, {'trained' if health.trained else 'untrained'})"
              f", input {raw.get('image_size', '?')} px, dtype {raw.get('dtype', '?')}",
              f"Backend: {health.backend} on {health.device}, providers: {', '.join(health.providers) or 'none'}",
              f"GPU used by the engine: {'yes, ' + (health.gpu_name or 'a GPU') if health.gpu else 'no (CPU)'}"]
    return lines


def format_report(facts: Facts, qgis_version: str, now: float | None = None) -> str:
    """The report as plain text, without tokens or URL credentials."""
    settings, status = facts.settings, facts.status
    model = settings.model_dir or "the engine's embedded default model"
    lines = [f"RS-MoE diagnostics, {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}",
             f"QGIS: {qgis_version}, Qt {QT_VERSION_STR}, Python {sys.version.split()[0]} ({platform.platform()})",
             f"Plugin: rsmoe_plugin {plugin_version()} ({PLUGIN_DIR})",
             f"Engine settings ({settings.source}): mode {settings.mode}, python {settings.python or '(none)'}, "
             f"model {model}, backend {settings.backend}, device {settings.device}"
             + (f", URL {settings.url}" if settings.mode == MODE_CONNECT else ""),
             f"NVIDIA GPUs (nvidia-smi): {facts.gpu.describe()}"]
    lines += _probe_lines(facts.probe, settings)
    lines += _engine_lines(status)
    venv = facts.setup_root / VENV_DIR
    state = read_state(facts.setup_root / STATE_FILE)
    lines.append(f"Set-up environment: {venv}" + (
        f" (engine {state.engine_version}, torch {state.torch_build} build)" if state and venv.exists()
        else " (none)"))
    setup_log = tail_lines(facts.setup_root / LOG_FILE, SETUP_LOG_LINES)
    if setup_log:
        lines += [f"Last lines of the set-up log ({facts.setup_root / LOG_FILE}):", setup_log]
    log_path = Path(status.log_path) if status.log_path else None
    engine_log = tail_lines(log_path, LOG_LINES)
    lines += [f"Last lines of the engine log ({log_path}):", engine_log] if engine_log else [
        "Engine log: none (no engine started by the plugin in this session)"]
    return redact("\n".join(lines) + "\n", facts.secrets)


def gather(manager: EngineManager, setup_root: Path) -> str:
    """Collect the facts (probing the engine's interpreter: seconds) and format the report (worker thread)."""
    settings = manager.settings()
    probe = probe_engine(settings.python, cwd=setup_root if setup_root.is_dir() else None) \
        if settings.python and settings.mode != MODE_CONNECT else None
    facts = Facts(settings=settings, status=manager.status, probe=probe, gpu=detect_gpu(), setup_root=setup_root,
                  secrets=tuple(s for s in (settings.token, manager.token) if s))
    return format_report(facts, Qgis.QGIS_VERSION)
