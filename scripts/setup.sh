#!/usr/bin/env bash
# Creates .venv (once) and installs lightning_tiercache with its test and example extras.
# Where a CPU build of torch 2.13.0 is available locally it is taken first (fast, no multi-GB download);
# elsewhere pip resolves torch>=2.4 as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch"
  python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>/dev/null \
    || python -m pip install -q --disable-pip-version-check "torch>=2.4"
fi
echo "[setup] installing lightning_tiercache[dev]"
python -m pip install -q --disable-pip-version-check -e ".[dev]"
