#!/usr/bin/env python3
"""Train one joint SentencePiece model on the training text and encode every split with it (the demo's step 2).

    python scripts/spm_train.py --input train.de train.en --model-prefix work/spm --vocab-size 4000 \
        --encode work/split/train.de:work/bpe/train.de work/split/train.en:work/bpe/train.en ...

``--encode IN:OUT`` writes the pieces of each line of IN, space-separated, to OUT (what
``fairseq-preprocess`` reads; ``fairseq-generate --remove-bpe sentencepiece`` undoes it).
The vocabulary size is a soft limit, so a small corpus gets a smaller vocabulary instead of an error.
The training and encoding are the recipes' (``python -m deepnet_recipes.tools spm-train / spm-encode``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deepnet_recipes.tools import encode_files, train_sentencepiece  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", type=Path, required=True, help="training text files")
    parser.add_argument("--model-prefix", type=Path, required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--model-type", default="unigram", choices=("unigram", "bpe", "char", "word"))
    parser.add_argument("--input-sentence-size", type=int, default=1_000_000)
    parser.add_argument("--encode", nargs="*", default=[], metavar="IN:OUT")
    args = parser.parse_args(argv)
    pieces = train_sentencepiece(args.input, args.model_prefix, args.vocab_size, args.model_type,
                                 input_sentence_size=args.input_sentence_size)
    print(f"sentencepiece {args.model_type} model {args.model_prefix}.model ({pieces} pieces)")
    encode_files(Path(f"{args.model_prefix}.model"), args.encode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
