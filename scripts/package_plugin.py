#!/usr/bin/env python3
"""Build the installable QGIS plugin zip: ``dist/rsmoe_plugin.zip`` holding ``rsmoe_plugin/`` with
``metadata.txt`` (from the repository root) inside it.

    python3 scripts/package_plugin.py [--out dist/rsmoe_plugin.zip]

Install it in QGIS with Plugins > Manage and Install Plugins > Install from ZIP, or unpack it into
a profile's ``python/plugins`` folder. Needs only the standard library (no QGIS).
"""
from __future__ import annotations

import argparse
import configparser
import logging
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "rsmoe_plugin"
EXCLUDED_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache"}
EXCLUDED_SUFFIXES = {".pyc", ".pyo", ".orig", ".rej", ".swp"}
REQUIRED_METADATA = ("name", "qgisMinimumVersion", "description", "version", "author", "email", "about",
                     "tracker", "repository", "hasProcessingProvider")

log = logging.getLogger("package_plugin")


def read_metadata(path: Path) -> configparser.ConfigParser:
    """Parse metadata.txt the way QGIS does and check the fields the plugin repository requires."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keep qgisMinimumVersion's case
    if not parser.read(path, encoding="utf-8"):
        raise SystemExit(f"package_plugin: cannot read {path}")
    missing = [k for k in REQUIRED_METADATA if not parser.get("general", k, fallback="").strip()]
    if missing:
        raise SystemExit(f"package_plugin: {path} lacks {', '.join(missing)}")
    return parser


def plugin_files(package_dir: Path) -> list[Path]:
    files = []
    for path in sorted(package_dir.rglob("*")):
        if not path.is_file() or any(part in EXCLUDED_DIRS for part in path.relative_to(package_dir).parts):
            continue
        if path.suffix in EXCLUDED_SUFFIXES or path.name == "metadata.txt":
            continue
        files.append(path)
    return files


def build(out: Path, root: Path = ROOT) -> Path:
    """Write the zip and return its path."""
    metadata = root / "metadata.txt"
    meta = read_metadata(metadata)
    package_dir = root / PACKAGE
    if not (package_dir / "__init__.py").is_file():
        raise SystemExit(f"package_plugin: {package_dir} is not a Python package")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in plugin_files(package_dir):
            info = zipfile.ZipInfo(f"{PACKAGE}/{path.relative_to(package_dir).as_posix()}", (2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())
        info = zipfile.ZipInfo(f"{PACKAGE}/metadata.txt", (2020, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        zf.writestr(info, metadata.read_bytes())
    tmp.replace(out)
    log.info("wrote %s (%s %s)", out, meta.get("general", "name"), meta.get("general", "version"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist" / f"{PACKAGE}.zip", help="zip to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
