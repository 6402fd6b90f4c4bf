#!/usr/bin/env bash
# The one prepared GPU check: at most ~6 minutes on one H100/H200, one markdown table of ratios measured side
# by side in one run (benchmarks/gpu_check.py says which).
#
#   bash benchmarks/gpu_check.sh           # on the GPU machine
#   bash benchmarks/gpu_check.sh --tiny    # the same checks at a tiny size on a CPU (the test suite runs this)
#
# The GPU machines have torch, transformers and accelerate but not every dependency of rho1 (no `datasets`),
# so rho1 runs from src/ without being installed; any wheel brought along in benchmarks/wheels/ (e.g.
# liger-kernel) is installed first, without its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
for wheel in benchmarks/wheels/*.whl; do
    if [ -e "$wheel" ]; then "$PYTHON" -m pip install -q --no-deps "$wheel"; fi
done
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
