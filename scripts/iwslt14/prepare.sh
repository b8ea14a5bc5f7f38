#!/usr/bin/env bash
# IWSLT-14 De-En data (standard split): download/verify, tokenize, lowercase, SentencePiece, binarize.
# Options: iwslt14/prepare.sh --help.  Every step is printed with --dry-run; see docs/recipes.md.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || { echo "iwslt14/prepare.sh: error: $PY not found (activate the venv: . .venv/bin/activate)" >&2; exit 5; }
exec "$PY" -m deepnet_recipes.iwslt14 prepare "$@"
