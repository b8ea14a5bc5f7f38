#!/usr/bin/env python3
"""Pull the detokenized hypotheses out of a ``fairseq-generate`` log and score them with sacreBLEU.

    python scripts/score_bleu.py --generate-log gen.out --reference test.en --hyp-out hyp.en --json bleu.json

Hypotheses are the ``D-<id>`` lines (``H-<id>`` as a fallback) put back in corpus order by sample id,
so they line up with the *raw* reference file (the text before SentencePiece), which is what is scored:
sacreBLEU's own 13a tokenization on plain detokenized text, as recommended for comparable numbers.
The scoring is :func:`deepnet_fairseq.evaluation.score_generate_output` (also used by ``deepnet-sweep``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from deepnet_fairseq.evaluation import MissingHypotheses, score_generate_output


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generate-log", type=Path, required=True, help="stdout of fairseq-generate")
    parser.add_argument("--reference", type=Path, required=True, help="raw reference text, one line per sample")
    parser.add_argument("--hyp-out", type=Path, required=True, help="writes the hypotheses here, in corpus order")
    parser.add_argument("--json", type=Path, help="writes {bleu, signature, ...} here")
    parser.add_argument("--name", default="", help="label for the printed line")
    args = parser.parse_args(argv)
    try:
        result = score_generate_output(args.generate_log, args.reference, args.hyp_out, args.json)
    except MissingHypotheses as err:
        print(f"score_bleu.py: error: {err}", file=sys.stderr)
        return 1
    label = f"[{args.name}] " if args.name else ""
    print(f"{label}{result['score_line']}")
    print(f"{label}sacreBLEU signature: {result['signature']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
