#!/usr/bin/env bash
# Run a set of Lightning's own test modules with and without TierCacheCallback() appended to every Trainer.
#
#   scripts/lightning_suite/run.sh LIGHTNING_CHECKOUT OUT_DIR [MODE] [TEST_PATHS...]
#
# LIGHTNING_CHECKOUT: a checkout of github.com/Lightning-AI/pytorch-lightning at the tag of the installed
# Lightning (its tests/ folder is used; Lightning's sdist has no tests). OUT_DIR gets off.xml/on.xml (JUnit)
# and the logs. MODE: off, on or both (default). TEST_PATHS default to the CPU modules listed below.
# Extra test-only packages (cloudpickle, ...) can be put on EXTRA_PYTHONPATH. Compare with compare.py.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
checkout="$(cd "$1" && pwd)"
out="$(mkdir -p "$2" && cd "$2" && pwd)"
mode="${3:-both}"
shift 3 || shift $#
paths=("$@")
if [ ${#paths[@]} -eq 0 ]; then
  paths=(tests_pytorch/loops tests_pytorch/trainer/logging_ tests_pytorch/callbacks tests_pytorch/tuner
         tests_pytorch/strategies/test_ddp.py tests_pytorch/strategies/test_ddp_integration.py
         tests_pytorch/strategies/test_ddp_integration_comm_hook.py)
fi
python="${PYTHON:-python}"
run() {
  local switch="$1"
  (cd "$checkout/tests" && \
    PYTHONPATH="$here:$repo${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}" TIERCACHE_SUITE="$switch" \
    timeout "${SUITE_TIMEOUT_S:-5400}" "$python" -m pytest "${paths[@]}" -p tiercache_suite_plugin \
      -p no:cacheprovider -q --continue-on-collection-errors --timeout "${TEST_TIMEOUT_S:-300}" \
      --junitxml="$out/$switch.xml" > "$out/$switch.log" 2>&1) || true
  tail -n 3 "$out/$switch.log"
}
case "$mode" in
  off|on) run "$mode" ;;
  both) run off; run on ;;
  *) echo "MODE must be off, on or both, got $mode" >&2; exit 2 ;;
esac
