#!/usr/bin/env python3
"""Build the installable QGIS plugin zip: ``dist/rsmoe_plugin.zip`` holding ``rsmoe_plugin/`` with
``metadata.txt`` (from the repository root) inside it.

    python3 scripts/package_plugin.py [--out dist/rsmoe_plugin.zip] [--with-engine [--wheel WHEEL]]

``--with-engine`` also puts the engine wheel (built by ``scripts/build_wheel.py``, or the given ``--wheel``)
and the list of base-weight packages into ``rsmoe_plugin/engine_dist/``: the plugin's "Set up the engine"
then needs nothing else from this repository.
Install it in QGIS with Plugins > Manage and Install Plugins > Install from ZIP, or unpack it into
a profile's ``python/plugins`` folder. Needs only the standard library (no QGIS).
"""
from __future__ import annotations

import argparse
import configparser
import logging
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rsmoe_plugin.engine_setup import BASE_WEIGHTS_FILE, BUNDLE_DIR  # noqa: E402 - standard library only
from scripts.build_wheel import build_wheel  # noqa: E402

PACKAGE = "rsmoe_plugin"
BASE_WEIGHTS = Path("requirements") / "base-weights.txt"
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
        if path.relative_to(package_dir).parts[0] == BUNDLE_DIR:  # added by --with-engine only
            continue
        files.append(path)
    return files


def _add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(f"{PACKAGE}/{name}", (2020, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def build(out: Path, root: Path = ROOT, wheel: Path | None = None) -> Path:
    """Write the zip and return its path; with ``wheel``, the engine wheel and the base-weight list go into
    ``rsmoe_plugin/engine_dist/``."""
    metadata = root / "metadata.txt"
    meta = read_metadata(metadata)
    package_dir = root / PACKAGE
    if not (package_dir / "__init__.py").is_file():
        raise SystemExit(f"package_plugin: {package_dir} is not a Python package")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in plugin_files(package_dir):
            _add(zf, path.relative_to(package_dir).as_posix(), path.read_bytes())
        _add(zf, "metadata.txt", metadata.read_bytes())
        if wheel is not None:
            _add(zf, f"{BUNDLE_DIR}/{wheel.name}", wheel.read_bytes())
            _add(zf, f"{BUNDLE_DIR}/{BASE_WEIGHTS_FILE}", (root / BASE_WEIGHTS).read_bytes())
    tmp.replace(out)
    log.info("wrote %s (%s %s%s)", out, meta.get("general", "name"), meta.get("general", "version"),
             f", with the engine {wheel.name}" if wheel is not None else "")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist" / f"{PACKAGE}.zip", help="zip to write")
    parser.add_argument("--with-engine", action="store_true",
                        help="bundle the engine wheel and the base-weight list (for 'Set up the engine')")
    parser.add_argument("--wheel", type=Path, help="with --with-engine: this wheel instead of building one")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.with_engine:
        build(args.out.resolve())
    elif args.wheel is not None:
        build(args.out.resolve(), wheel=args.wheel.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="rsmoe-plugin-") as tmp:
            build(args.out.resolve(), wheel=build_wheel(Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
