#!/usr/bin/env python3
"""Train one joint SentencePiece model on the training text and encode every split with it.

    python scripts/spm_train.py --input train.de train.en --model-prefix work/spm --vocab-size 4000 \
        --encode work/split/train.de:work/bpe/train.de work/split/train.en:work/bpe/train.en ...

``--encode IN:OUT`` writes the pieces of each line of IN, space-separated, to OUT (what
``fairseq-preprocess`` reads; ``fairseq-generate --remove-bpe sentencepiece`` undoes it).
The vocabulary size is a soft limit, so a small corpus gets a smaller vocabulary instead of an error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import sentencepiece as spm


def train(inputs, model_prefix: Path, vocab_size: int, model_type: str, seed_sentences: int) -> None:
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=[str(p) for p in inputs],
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        hard_vocab_limit=False,
        input_sentence_size=seed_sentences,
        shuffle_input_sentence=True,
        # fairseq's dictionary adds its own <s>/<pad>/</s>/<unk>; keep spm's ids out of the way.
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        num_threads=1,
        minloglevel=2,
    )


def encode(model_file: Path, pairs) -> None:
    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    for spec in pairs:
        src, sep, dst = spec.partition(":")
        if not sep:
            raise SystemExit(f"spm_train.py: --encode wants IN:OUT, got {spec!r}")
        with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
            for line in fin:
                fout.write(" ".join(processor.encode(line.rstrip("\n"), out_type=str)) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", type=Path, required=True, help="training text files")
    parser.add_argument("--model-prefix", type=Path, required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--model-type", default="unigram", choices=("unigram", "bpe", "char", "word"))
    parser.add_argument("--input-sentence-size", type=int, default=1_000_000)
    parser.add_argument("--encode", nargs="*", default=[], metavar="IN:OUT")
    args = parser.parse_args(argv)
    for path in args.input:
        if not path.exists() or path.stat().st_size == 0:
            parser.error(f"{path}: missing or empty")
    train(args.input, args.model_prefix, args.vocab_size, args.model_type, args.input_sentence_size)
    model = args.model_prefix.with_name(args.model_prefix.name + ".model")
    vocab = sum(1 for _ in open(args.model_prefix.with_name(args.model_prefix.name + ".vocab"), encoding="utf-8"))
    print(f"sentencepiece {args.model_type} model {model} ({vocab} pieces)")
    encode(model, args.encode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
