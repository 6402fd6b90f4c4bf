#!/usr/bin/env bash
# Setting B of the real-data benchmark (continual pretraining from a base on general text) at a GPU's size:
# the `large` preset (52M parameters), bf16, about 20M tokens per run. About 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_real_data.sh [DATA_DIR] [OUT]            # on the GPU machine
#   PRESET=nano TOKENS=40960 PRECISION=no bash benchmarks/gpu_real_data.sh   # the same script on a CPU, in a minute
#
# The noisy corpus has 2.0M tokens, so 20M tokens per run are ten passes over it (the reference: several
# passes over 0.8M tokens of clean GSM8K); see benchmarks/BENCHMARKS.md for what that means for the numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-../shared/data}
OUT=${2:-runs/bench-real-gpu}
PRESET=${PRESET:-large}
TOKENS=${TOKENS:-20000000}
PRECISION=${PRECISION:-bf16}
BATCH=${BATCH:-64}
LR=${LR:-1e-3}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
"$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
exec "$PYTHON" benchmarks/real_data_efficiency.py --data-dir "$DATA_DIR" --out "$OUT" --settings B --seeds 0 \
    --presets "$PRESET" --precision "$PRECISION" --batch-size "$BATCH" --lr "$LR" --levers \
    --train-tokens "$TOKENS" --base-tokens "$TOKENS" --reference-tokens $((TOKENS / 2))
