#!/usr/bin/env bash
# WMT-17 En-De data (Table 1): download/verify, Moses tokenization, joint SentencePiece, fairseq-preprocess.
# Options: wmt17/prepare.sh --help.  Every step is printed with --dry-run; see docs/recipes.md.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || { echo "wmt17/prepare.sh: error: $PY not found (activate the venv: . .venv/bin/activate)" >&2; exit 5; }
exec "$PY" -m deepnet_recipes.wmt17 prepare "$@"
