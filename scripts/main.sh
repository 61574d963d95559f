#!/usr/bin/env bash
# Sets up .venv if needed, then runs the main job: a short fine-tune and a few-shot eval of a small
# Llama-style model on Python's own documentation, with TierCacheCallback on. W&B runs offline unless
# WANDB_API_KEY is set. Extra arguments go to both runs (e.g. --trainer.max_steps 40).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, whatever .venv has installed
if [ -z "${WANDB_API_KEY:-}" ]; then
  export WANDB_MODE=offline
fi
python examples/main.py "$@"
