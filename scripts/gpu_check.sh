#!/usr/bin/env bash
# The GPU check: the CUDA tests and the --full benchmarks on one GPU, in at most 8 minutes, into one results file.
#
#   bash scripts/gpu_check.sh [RESULTS_FILE]      (default: gpu_check_results.txt in the repository root)
#
# Steps, each under its own time limit (the limits add up to 450 s, plus start-up):
#   1. pytest -m gpu                                    (the CUDA paths: streams, events, pinned pool, grads)
#   2. bench activations --full --json                  (no offload, checkpoint, save_on_cpu, torchtune's
#                                                        OffloadActivations when installed, ours to host/disk)
#   3. bench kv --full --json                           (DynamicCache, DynamicCache(offloading=True), ours)
#   4. bench store --full --json                        (codec, disk and memory moves against their limits)
# A step that fails or runs out of time is recorded and the next one runs. Without a CUDA device the script says
# so, writes that to the results file, and exits 0 (a dry run: it lists the steps it would have run).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${1:-gpu_check_results.txt}"
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
export WANDB_MODE=offline WANDB_SILENT=true PYTHONWARNINGS=ignore

STEPS=(
  "150|$PY -m pytest -q -m gpu -p no:cacheprovider tests"
  "150|$PY -m lightning_tiercache.bench activations --full --json"
  "90|$PY -m lightning_tiercache.bench kv --full --json"
  "60|$PY -m lightning_tiercache.bench store --full --json"
)

{
  echo "# lightning_tiercache GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} >"$RESULTS"

DEVICE="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)"
if [ -z "$DEVICE" ]; then
  {
    echo "no CUDA device on this machine: nothing was run (dry run). The steps on a GPU would be:"
    for step in "${STEPS[@]}"; do echo "  [${step%%|*} s] ${step#*|}"; done
  } | tee -a "$RESULTS"
  exit 0
fi

{
  echo "device: $DEVICE"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  if "$PY" -c 'import torchtune' 2>/dev/null; then
    echo "torchtune: installed"
  else
    echo "torchtune: not installed; trying pip (needs network)"
    timeout 60 "$PY" -m pip install -q torchtune >/dev/null 2>&1 && echo "torchtune: installed now" \
      || echo "torchtune: could not be installed; the activations bench runs without its variant"
  fi
} 2>&1 | tee -a "$RESULTS"

failed=0
for step in "${STEPS[@]}"; do
  limit="${step%%|*}"
  cmd="${step#*|}"
  echo "## [$limit s] $cmd" | tee -a "$RESULTS"
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout --kill-after=10 "$limit" $cmd >>"$RESULTS" 2>&1
  rc=$?
  echo "## exit $rc after $(( $(date +%s) - start )) s$([ "$rc" = 124 ] && echo ' (time limit)')" | tee -a "$RESULTS"
  [ "$rc" = 0 ] || failed=1
done
echo "results: $RESULTS"
exit "$failed"
