#!/usr/bin/env python3
"""Pull the detokenized hypotheses out of a ``fairseq-generate`` log and score them with sacreBLEU.

    python scripts/score_bleu.py --generate-log gen.out --reference test.en --hyp-out hyp.en --json bleu.json

Hypotheses are the ``D-<id>`` lines (``H-<id>`` as a fallback) put back in corpus order by sample id,
so they line up with the *raw* reference file (the text before SentencePiece), which is what is scored:
sacreBLEU's own 13a tokenization on plain detokenized text, as recommended for comparable numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import sacrebleu


def read_hypotheses(log: Path, expected: int) -> List[str]:
    by_prefix: Dict[str, Dict[int, str]] = {"D": {}, "H": {}}
    with open(log, encoding="utf-8") as handle:
        for line in handle:
            head, sep, rest = line.rstrip("\n").partition("\t")
            if not sep or "-" not in head:
                continue
            prefix, _, index = head.partition("-")
            if prefix in by_prefix and index.isdigit():
                # "<score>\t<text>"; the text may be empty for a degenerate hypothesis.
                text = rest.split("\t", 1)[1] if "\t" in rest else ""
                by_prefix[prefix][int(index)] = text
    found = by_prefix["D"] or by_prefix["H"]
    missing = [i for i in range(expected) if i not in found]
    if missing:
        raise SystemExit(
            f"score_bleu.py: {log} has hypotheses for {len(found)} of {expected} reference lines "
            f"(first missing id {missing[0]})"
        )
    return [found[i] for i in range(expected)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generate-log", type=Path, required=True, help="stdout of fairseq-generate")
    parser.add_argument("--reference", type=Path, required=True, help="raw reference text, one line per sample")
    parser.add_argument("--hyp-out", type=Path, required=True, help="writes the hypotheses here, in corpus order")
    parser.add_argument("--json", type=Path, help="writes {bleu, signature, ...} here")
    parser.add_argument("--name", default="", help="label for the printed line")
    args = parser.parse_args(argv)

    with open(args.reference, encoding="utf-8") as handle:
        references = [line.rstrip("\n") for line in handle]
    hypotheses = read_hypotheses(args.generate_log, len(references))
    args.hyp_out.write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")

    metric = sacrebleu.BLEU()
    score = metric.corpus_score(hypotheses, [references])
    signature = str(metric.get_signature())
    label = f"[{args.name}] " if args.name else ""
    print(f"{label}{score}")
    print(f"{label}sacreBLEU signature: {signature}")
    if args.json:
        args.json.write_text(json.dumps({
            "bleu": round(score.score, 2),
            "score_line": str(score),
            "signature": signature,
            "sentences": len(references),
            "hypotheses": str(args.hyp_out),
            "reference": str(args.reference),
        }, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
