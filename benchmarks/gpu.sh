#!/usr/bin/env bash
# GPU benchmarks for a CUDA machine: training tokens/s (fp16, bf16) of deepnet_transformer --deepnorm
# vs fairseq's transformer, with and without apex's fused LayerNorm when apex is installed, and peak
# GPU memory at 100L-100L base with --checkpoint-activations. Results go to benchmarks/results/gpu*.
#
#   bash benchmarks/gpu.sh                      # defaults: 18L-18L, 32x128-token batch, 20 timed steps
#   bash benchmarks/gpu.sh --layers 6 --steps 50
#   PYTHON=/path/to/python bash benchmarks/gpu.sh
#
# Without a CUDA device (or without torch) it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if ! reason=$("$PYTHON" - <<'EOF' 2>&1
import sys
try:
    import torch
except Exception as exc:  # torch missing or broken
    print(f"torch does not import ({exc})")
    sys.exit(1)
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} sees no CUDA device (torch.version.cuda={torch.version.cuda})")
    sys.exit(1)
print(torch.cuda.get_device_name())
EOF
); then
    echo "benchmarks/gpu.sh: skipping GPU benchmarks: ${reason}"
    exit 0
fi

echo "benchmarks/gpu.sh: running on ${reason}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m benchmarks.gpu "$@"
