#!/usr/bin/env bash
# Train the 200-layer or 1000-layer OPUS-100 DeepNet: train.sh {200l|1000l} [GPUS [UPDATE_FREQ|auto]].
# Options: opus100/train.sh --help.  Every step is printed with --dry-run; see docs/recipes.md.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || { echo "opus100/train.sh: error: $PY not found (activate the venv: . .venv/bin/activate)" >&2; exit 5; }
exec "$PY" -m deepnet_recipes.opus100 train "$@"
