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
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q --disable-pip-version-check --upgrade pip
  echo "[setup] installing torch"
  python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>/dev/null \
    || python -m pip install -q --disable-pip-version-check "torch>=2.4"
fi
# This checkout's package is imported first (scripts set PYTHONPATH to it), so a .venv that already has every
# dependency, for example one shared with another checkout, needs no install.
if PYTHONPATH="$PWD" python -c "import lightning_tiercache, docstring_parser, hypothesis, jsonargparse, matplotlib, \
pytest, pytest_timeout, transformers, wandb, wandb_workspaces" 2>/dev/null && [ -x .venv/bin/ruff ] && [ -x .venv/bin/mypy ]; then
  echo "[setup] .venv has every dependency; nothing to install (after a pyproject change: pip install -e '.[dev]')"
  exit 0
fi
echo "[setup] installing lightning_tiercache[dev]"
python -m pip install -q --disable-pip-version-check -e ".[dev]"
