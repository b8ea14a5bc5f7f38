#!/usr/bin/env bash
# Fig. 6 depth sweep: 10L-10L ... 100L-100L per scheme, 8k updates each; resumable; records divergence.
# Options: iwslt14/sweep.sh --help.  Every step is printed with --dry-run; see docs/recipes.md.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || { echo "iwslt14/sweep.sh: error: $PY not found (activate the venv: . .venv/bin/activate)" >&2; exit 5; }
exec "$PY" -m deepnet_recipes.iwslt14 sweep "$@"
