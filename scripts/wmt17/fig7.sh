#!/usr/bin/env bash
# Fig. 7 grid (Table 6): fig7.sh [GPUS] [--schemes a,b] [--out DIR] [overrides] [-- fairseq flags].
# Options: wmt17/fig7.sh --help.  Every step is printed with --dry-run; see docs/recipes.md.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || { echo "wmt17/fig7.sh: error: $PY not found (activate the venv: . .venv/bin/activate)" >&2; exit 5; }
exec "$PY" -m deepnet_recipes.wmt17 fig7 "$@"
