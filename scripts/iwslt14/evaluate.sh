#!/usr/bin/env bash
# Score one IWSLT-14 run: beam 5, tokenized BLEU (+ sacreBLEU).
# Options: iwslt14/evaluate.sh --help.  Every step is printed with --dry-run; see docs/recipes.md.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || { echo "iwslt14/evaluate.sh: error: $PY not found (activate the venv: . .venv/bin/activate)" >&2; exit 5; }
exec "$PY" -m deepnet_recipes.iwslt14 evaluate "$@"
