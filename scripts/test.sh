#!/usr/bin/env bash
# Sets up .venv if needed, then runs the test suite (CPU; GPU tests are opt-in with -m gpu), ruff and mypy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, whatever .venv has installed
export WANDB_MODE=offline WANDB_SILENT=true
echo "[test] ruff"
ruff check .
ruff format --check .
echo "[test] mypy"
mypy
echo "[test] pytest"
python -m pytest -q --durations=15 "$@"
