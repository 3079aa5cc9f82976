#!/usr/bin/env bash
# The test command. Runs the whole suite with the active python (tests marked `vllm` skip there unless
# vllm is installed), then the `vllm` tests in the vLLM venv when it exists (scripts/setup_vllm_cpu.sh).
#   bash scripts/test.sh           # everything, slow tests included (~25 min on 2 CPU cores)
#   bash scripts/test.sh --fast    # skip the tests marked slow
set -euo pipefail
cd "$(dirname "$0")/.."
# the quick start's venv when there is one, so a new shell needs no `source .venv/bin/activate`
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python}
VLLM_PY=${VLLM_PYTHON:-.venv-vllm/bin/python}
marker=()
[ "${1:-}" = "--fast" ] && marker=(-m "not slow")

# pytest exits non-zero on any failure and with 5 when no test ran: both fail this script.
"$PY" -m pytest -q -rs "${marker[@]}"
if [ -x "$VLLM_PY" ]; then
    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_TARGET_DEVICE=cpu "$VLLM_PY" -m pytest -q -rs -m vllm -p no:cacheprovider
else
    echo "no vLLM venv at $VLLM_PY: the tests marked vllm were skipped (make it: bash scripts/setup_vllm_cpu.sh)"
fi
