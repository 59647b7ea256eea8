"""What the machine offers an engine: Python interpreters, an NVIDIA GPU, the engine wheel, an engine's packages.

Plain functions on the standard library (no Qt, no QGIS), so they are tested on their own: finding a
Python the engine supports (its wheel's ``Requires-Python``), reading ``nvidia-smi`` to choose the torch
build, reading a wheel's metadata, probing an engine interpreter's packages (torch, ONNX Runtime, CUDA),
and keeping secrets (tokens, credentials in index URLs) out of logs and reports.
"""
from __future__ import annotations

import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: environment variables that belong to QGIS's own Python and must not reach another interpreter
DROPPED_ENV = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONEXECUTABLE")

#: the torch CUDA builds PyTorch publishes (wheel index tag, lowest CUDA version of the driver it needs), newest first
TORCH_CUDA_BUILDS: tuple[tuple[str, tuple[int, int]], ...] = (("cu130", (13, 0)), ("cu128", (12, 8)),
                                                              ("cu126", (12, 6)))
PYTORCH_INDEX = "https://download.pytorch.org/whl"

def clean_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: this process's) without QGIS's Python variables, for an engine subprocess."""
    env = os.environ if environ is None else environ
    cleaned = {k: v for k, v in env.items() if k not in DROPPED_ENV}
    cleaned.setdefault("PYTHONUNBUFFERED", "1")
    return cleaned


def venv_python(venv: Path) -> Path:
    """The interpreter of the virtual environment ``venv`` (POSIX ``bin/python`` or Windows ``Scripts``)."""
    for candidate in (venv / "bin" / "python", venv / "Scripts" / "python.exe", venv / "bin" / "python3"):
        if candidate.exists():
            return candidate
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def interpreter_of(python: str) -> Path | None:
    """The Python interpreter an engine setting names: an interpreter, a venv folder or its ``rsmoe``
    executable (whose interpreter lies beside it); None for a folder without one."""
    path = Path(python).expanduser()
    if path.is_dir():
        found = venv_python(path)
        return found if found.exists() else None
    if path.name.lower().startswith("rsmoe"):
        for name in ("python", "python3", "python.exe"):
            if (path.parent / name).exists():
                return path.parent / name
    return path


# ------------------------------------------------------------------------------------- versions
_CLAUSE = re.compile(r"^\s*(~=|==|!=|<=|>=|<|>)\s*([0-9][0-9.]*)(\.\*)?\s*$")


def _as_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def version_satisfies(version: Sequence[int], specifier: str) -> bool:
    """Whether a Python version (``(3, 11, 2)``) satisfies a ``Requires-Python`` such as ``>=3.11,<3.12``."""
    have = tuple(version)
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        match = _CLAUSE.match(clause)
        if match is None:
            raise ValueError(f"unsupported version clause {clause!r}")
        op, text, wildcard = match.groups()
        want = _as_tuple(text)
        if wildcard:  # ==3.11.* / !=3.11.*: a prefix match
            same = have[:len(want)] == want
            ok = same if op == "==" else not same
        else:
            size = max(len(have), len(want))
            mine, theirs = have + (0,) * (size - len(have)), want + (0,) * (size - len(want))
            ok = {"==": mine == theirs, "!=": mine != theirs, ">=": mine >= theirs, "<=": mine <= theirs,
                  ">": mine > theirs, "<": mine < theirs,
                  "~=": mine >= theirs and have[:len(want) - 1] == want[:-1]}[op]
        if not ok:
            return False
    return True


# ---------------------------------------------------------------------------------------- wheel
@dataclass(frozen=True)
class WheelInfo:
    """The engine wheel's metadata: what it needs (Python, torch) and which extras it offers."""

    path: Path
    name: str
    version: str
    requires_python: str
    requires: tuple[str, ...]
    extras: tuple[str, ...]

    @property
    def torch_requirement(self) -> str:
        """The wheel's own torch pin (``torch==2.13.0``), installed before everything else."""
        for req in self.requires:
            if re.match(r"^torch\b", req) and "extra ==" not in req:
                return req.split(";")[0].replace(" ", "")
        return "torch"


def read_wheel(path: Path) -> WheelInfo:
    """Read ``path``'s ``*.dist-info/METADATA``; ValueError when it is not a wheel."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
            if len(names) != 1:
                raise ValueError(f"{path.name} is not a wheel (no single .dist-info/METADATA)")
            meta = email.parser.Parser().parsestr(zf.read(names[0]).decode("utf-8"))
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"cannot read the wheel {path}: {exc}") from None
    return WheelInfo(path=path, name=str(meta.get("Name", "")), version=str(meta.get("Version", "")),
                     requires_python=str(meta.get("Requires-Python", "")),
                     requires=tuple(meta.get_all("Requires-Dist") or ()),
                     extras=tuple(meta.get_all("Provides-Extra") or ()))


# --------------------------------------------------------------------------------------- Python
_PYTHON_PROBE = ("import json, sys\n"
                 "try:\n    import venv, ensurepip\n    ok = True\nexcept ImportError:\n    ok = False\n"
                 "print(json.dumps({'executable': sys.executable, 'version': list(sys.version_info[:3]), 'venv': ok}))")


@dataclass(frozen=True)
class PythonCandidate:
    """A Python interpreter found on this machine; ``problem`` says why the engine cannot use it ('' if it can)."""

    executable: str
    version: tuple[int, ...]
    found_as: str
    problem: str = ""

    @property
    def usable(self) -> bool:
        return not self.problem

    def label(self) -> str:
        text = f"Python {'.'.join(map(str, self.version))}: {self.executable}"
        return text + (f" ({self.problem})" if self.problem else "")


def python_commands(system: str = sys.platform, environ: Mapping[str, str] | None = None,
                    which: Callable[[str], str | None] = shutil.which) -> list[list[str]]:
    """The commands that may start a Python 3.11, most specific first (what :func:`find_pythons` probes)."""
    env = os.environ if environ is None else environ
    commands: list[list[str]] = []
    if system.startswith("win"):
        if which("py"):
            commands.append(["py", "-3.11"])
        if env.get("LOCALAPPDATA"):
            commands.append([str(Path(env["LOCALAPPDATA"]) / "Programs" / "Python" / "Python311" / "python.exe")])
    found = which("python3.11")
    if found:
        commands.append([found])
    if not system.startswith("win"):
        commands += [[path] for path in ("/usr/bin/python3.11", "/usr/local/bin/python3.11",
                                         "/opt/homebrew/bin/python3.11",
                                         "/Library/Frameworks/Python.framework/Versions/3.11/bin/python3.11")]
    commands += [[found] for found in (which("python3"), which("python")) if found]
    return commands


def probe_python(command: Sequence[str], requires_python: str, timeout: float = 20.0) -> PythonCandidate | None:
    """Ask an interpreter its version and whether it can make a venv; None when it does not run."""
    if len(command) == 1 and not Path(command[0]).exists() and os.sep in command[0]:
        return None
    try:
        proc = subprocess.run([*command, "-c", _PYTHON_PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=timeout, env=clean_environment())
        info = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    if not isinstance(info, dict):
        return None
    version = tuple(int(v) for v in info.get("version", ()))
    problem = ""
    if requires_python and not version_satisfies(version, requires_python):
        problem = f"the engine needs Python {requires_python}"
    elif not info.get("venv"):
        problem = (f"cannot create virtual environments: install its venv module (Debian / Ubuntu: "
                   f"apt install python{version[0]}.{version[1]}-venv)")
    return PythonCandidate(str(info.get("executable") or command[0]), version, " ".join(command), problem)


def find_pythons(requires_python: str, commands: Iterable[Sequence[str]] | None = None) -> list[PythonCandidate]:
    """Every distinct interpreter found, the usable ones first (in the order of :func:`python_commands`)."""
    seen: set[str] = set()
    found: list[PythonCandidate] = []
    for command in (python_commands() if commands is None else commands):
        candidate = probe_python(command, requires_python)
        if candidate is None:
            continue
        key = os.path.realpath(candidate.executable)
        if key in seen:
            continue
        seen.add(key)
        found.append(candidate)
    return sorted(found, key=lambda c: not c.usable)


# ------------------------------------------------------------------------------------------ GPU
@dataclass(frozen=True)
class GpuDevice:
    index: int
    name: str
    memory_mib: int | None


@dataclass(frozen=True)
class GpuInfo:
    """What ``nvidia-smi`` reports: the NVIDIA GPUs, the driver and the highest CUDA version it supports."""

    devices: tuple[GpuDevice, ...] = ()
    driver: str | None = None
    cuda_version: tuple[int, int] | None = None
    note: str = ""

    @property
    def present(self) -> bool:
        return bool(self.devices)

    def describe(self) -> str:
        if not self.devices:
            return f"no NVIDIA GPU ({self.note})" if self.note else "no NVIDIA GPU"
        cuda = ".".join(map(str, self.cuda_version)) if self.cuda_version else "unknown"
        names = ", ".join(f"{d.index}: {d.name}" + (f" ({d.memory_mib} MiB)" if d.memory_mib else "")
                          for d in self.devices)
        return f"{names}; driver {self.driver or 'unknown'}, CUDA {cuda}"


NVIDIA_SMI_QUERY = ["--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader,nounits"]


def parse_gpu_query(text: str) -> tuple[tuple[GpuDevice, ...], str | None]:
    """The devices and driver of ``nvidia-smi --query-gpu=index,name,memory.total,driver_version
    --format=csv,noheader,nounits``."""
    devices: list[GpuDevice] = []
    driver = None
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        memory = parts[-2]
        devices.append(GpuDevice(int(parts[0]), ",".join(parts[1:-2]).strip(),
                                 int(float(memory)) if re.fullmatch(r"[\d.]+", memory) else None))
        driver = parts[-1] or driver
    return tuple(devices), driver


def parse_cuda_version(text: str) -> tuple[int, int] | None:
    """The ``CUDA Version: 12.4`` of ``nvidia-smi``'s header (the newest CUDA the driver supports)."""
    match = re.search(r"CUDA Version\s*:\s*(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def detect_gpu(nvidia_smi: str | None = None, timeout: float = 15.0) -> GpuInfo:
    """Ask ``nvidia-smi`` (on PATH unless given) which NVIDIA GPUs this machine has."""
    exe = nvidia_smi or shutil.which("nvidia-smi")
    if not exe:
        return GpuInfo(note="nvidia-smi not found")
    try:
        query = subprocess.run([exe, *NVIDIA_SMI_QUERY], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, timeout=timeout)
        if query.returncode != 0:
            return GpuInfo(note=f"nvidia-smi failed: {query.stdout.strip()[-200:]}")
        header = subprocess.run([exe], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return GpuInfo(note=f"nvidia-smi did not run: {exc}")
    devices, driver = parse_gpu_query(query.stdout)
    return GpuInfo(devices, driver, parse_cuda_version(header.stdout), "" if devices else "nvidia-smi lists none")


@dataclass(frozen=True)
class TorchChoice:
    """Which torch build to install (``cpu`` or a CUDA tag such as ``cu128``), from where, and why."""

    build: str
    index_url: str | None
    reason: str

    @property
    def cuda(self) -> bool:
        return self.build != "cpu"


def choose_torch(requested: str, gpu: GpuInfo, use_pytorch_index: bool = True) -> TorchChoice:
    """The torch build for ``requested`` (``auto``, ``cpu`` or ``cuda``) on a machine with ``gpu``.

    ``auto`` takes the newest CUDA build the driver supports when ``nvidia-smi`` reports a GPU, the CPU build
    otherwise; the build comes from PyTorch's wheel index unless ``use_pytorch_index`` is off (a mirror that
    holds the wanted build)."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown torch build {requested!r}: use auto, cpu or cuda")
    build, reason = "cpu", "CPU build asked for"
    if requested == "auto" and not gpu.present:
        reason = f"CPU build: {gpu.describe()}"
    elif requested != "cpu":
        fits = [tag for tag, need in TORCH_CUDA_BUILDS if gpu.cuda_version is None or gpu.cuda_version >= need]
        if gpu.cuda_version is None:
            build, reason = TORCH_CUDA_BUILDS[1][0], "CUDA build asked for (driver's CUDA version unknown)"
        elif fits:
            build, reason = fits[0], f"CUDA build for {gpu.describe()}"
        else:
            oldest = ".".join(map(str, TORCH_CUDA_BUILDS[-1][1]))
            reason = (f"CPU build: the NVIDIA driver supports CUDA {'.'.join(map(str, gpu.cuda_version))}, older "
                      f"than torch's oldest CUDA build ({oldest}); update the driver and set up again")
    index = f"{PYTORCH_INDEX}/{build}" if use_pytorch_index else None
    return TorchChoice(build, index, reason)


# ------------------------------------------------------------------------------- engine packages
#: run by an engine interpreter: its Python, packages, CUDA devices torch sees and ONNX Runtime's providers
PROBE_SCRIPT = r"""
import json, platform, sys
from importlib import metadata
out = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
       "packages": {}, "errors": []}
for name in ("rsmoe", "torch", "onnxruntime", "onnxruntime-gpu", "transformers", "peft", "numpy", "rasterio"):
    try:
        out["packages"][name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
try:
    import engine
    out["engine"] = engine.__version__
except Exception as exc:
    out["errors"].append(f"engine: {exc}")
try:
    import torch
    out["torch_cuda_build"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    out["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
except Exception as exc:
    out["errors"].append(f"torch: {exc}")
try:
    import onnxruntime
    out["onnxruntime_providers"] = onnxruntime.get_available_providers()
except Exception as exc:
    out["onnxruntime_providers"] = None
print("RSMOE-PROBE " + json.dumps(out))
sys.exit(1 if any(e.startswith(("engine", "torch")) for e in out["errors"]) else 0)
"""


@dataclass(frozen=True)
class EngineProbe:
    """What an engine interpreter holds (``PROBE_SCRIPT``'s answer), or why it could not be asked."""

    python: str
    data: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and not self.data.get("errors")


def parse_probe(output: str) -> dict[str, Any]:
    """The JSON line ``PROBE_SCRIPT`` printed; ValueError when there is none."""
    for line in reversed(output.splitlines()):
        if line.startswith("RSMOE-PROBE "):
            return json.loads(line[len("RSMOE-PROBE "):])
    raise ValueError("the probe printed no answer")


def probe_engine(python: str, cwd: Path | None = None, timeout: float = 120.0) -> EngineProbe:
    """Run ``PROBE_SCRIPT`` with the engine interpreter ``python`` (outside any source checkout: ``cwd``)."""
    exe = interpreter_of(python)
    if exe is None or not exe.exists():
        return EngineProbe(python, error=f"no Python interpreter at {python}")
    try:
        proc = subprocess.run([str(exe), "-c", PROBE_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, env=clean_environment(), cwd=str(cwd or Path.home()))
        data = parse_probe(proc.stdout)
    except (OSError, subprocess.SubprocessError) as exc:
        return EngineProbe(str(exe), error=f"cannot run it: {exc}")
    except ValueError:
        return EngineProbe(str(exe), error=f"it failed: {proc.stdout.strip()[-600:]}")
    return EngineProbe(str(exe), data)


# -------------------------------------------------------------------------------------- secrets
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@]+(?::[^/\s@]*)?@")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without the given secrets (tokens) and without credentials in URLs (``https://user:pw@``)."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return _URL_CREDENTIALS.sub(lambda m: m.group("scheme") + "***@", text)


def tail_lines(path: Path | None, lines: int) -> str:
    """The last ``lines`` non-empty lines of a text file ('' when it cannot be read)."""
    if path is None:
        return ""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])
