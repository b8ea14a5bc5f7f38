#!/usr/bin/env bash
# OPUS-100 (English-centric) data: download/verify, joint SentencePiece, per-pair fairseq-preprocess.
# Options: opus100/prepare.sh --help.  Every step is printed with --dry-run; see docs/recipes.md.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || { echo "opus100/prepare.sh: error: $PY not found (activate the venv: . .venv/bin/activate)" >&2; exit 5; }
exec "$PY" -m deepnet_recipes.opus100 prepare "$@"
