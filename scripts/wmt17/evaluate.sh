#!/usr/bin/env bash
# Average the last N checkpoints, beam 4 / lenpen 0.6, compound-split tokenized BLEU + sacreBLEU.
# Options: wmt17/evaluate.sh --help.  Every step is printed with --dry-run; see docs/recipes.md.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || { echo "wmt17/evaluate.sh: error: $PY not found (activate the venv: . .venv/bin/activate)" >&2; exit 5; }
exec "$PY" -m deepnet_recipes.wmt17 evaluate "$@"
