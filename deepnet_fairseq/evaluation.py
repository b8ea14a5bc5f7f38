"""Scoring ``fairseq-generate`` output: its hypotheses in corpus order, scored with sacreBLEU.

One implementation for every scorer of the project: ``deepnet-sweep`` (in-process), the demo's
``scripts/score_bleu.py`` and the recipes' ``python -m deepnet_recipes.tools bleu``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import sacrebleu
from sacrebleu.metrics.bleu import BLEUScore


class MissingHypotheses(ValueError):
    """A fairseq-generate output lacks hypotheses for some reference lines."""


def read_hypotheses(log: Path, expected: int) -> List[str]:
    """The hypotheses of a fairseq-generate output for sample ids ``0 .. expected - 1``, in that order.

    They are the ``D-<id>`` lines (detokenized, after ``--remove-bpe``), or the ``H-<id>`` lines when the
    output has no ``D-`` line; the text of a degenerate hypothesis may be empty. Raises
    :class:`MissingHypotheses` naming the first missing id.
    """
    by_prefix: Dict[str, Dict[int, str]] = {"D": {}, "H": {}}
    with open(log, encoding="utf-8") as handle:
        for line in handle:
            head, sep, rest = line.rstrip("\n").partition("\t")
            if not sep or "-" not in head:
                continue
            prefix, _, index = head.partition("-")
            if prefix in by_prefix and index.isdigit():
                # "<score>\t<text>"
                by_prefix[prefix][int(index)] = rest.split("\t", 1)[1] if "\t" in rest else ""
    found = by_prefix["D"] or by_prefix["H"]
    missing = [i for i in range(expected) if i not in found]
    if missing:
        raise MissingHypotheses(f"{log} has hypotheses for {len(found)} of {expected} reference lines "
                                f"(first missing id {missing[0]})")
    return [found[i] for i in range(expected)]


def sacrebleu_corpus(hypotheses: Sequence[str], references: Sequence[str],
                     lowercase: bool = False) -> Tuple[BLEUScore, str]:
    """(corpus score, signature) of detokenized sacreBLEU (13a tokenization, exp smoothing, one reference)."""
    metric = sacrebleu.BLEU(lowercase=lowercase)
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return score, str(metric.get_signature())


def score_generate_output(generate_log: Path, reference: Path, hyp_out: Path,
                          json_out: Path | None = None) -> Dict[str, object]:
    """Score a fairseq-generate output against the raw reference file (one line per sample).

    Writes the hypotheses, in corpus order, to ``hyp_out`` and (when given) the returned record to
    ``json_out``: ``bleu`` (rounded to 2 decimals), ``score_line``, ``signature``, ``sentences``,
    ``hypotheses`` and ``reference``.
    """
    with open(reference, encoding="utf-8") as handle:
        references = [line.rstrip("\n") for line in handle]
    hypotheses = read_hypotheses(generate_log, len(references))
    hyp_out.write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
    score, signature = sacrebleu_corpus(hypotheses, references)
    result: Dict[str, object] = {
        "bleu": round(score.score, 2), "score_line": str(score), "signature": signature,
        "sentences": len(references), "hypotheses": str(hyp_out), "reference": str(reference),
    }
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result
