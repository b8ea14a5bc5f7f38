#!/usr/bin/env python3
"""Deterministic train/valid/test split of a parallel corpus, grouped by one side's sentence.

Input is either a TSV file (``--tsv``, plain or ``.gz``; the bundled Tatoeba file has the columns
``en<TAB>de<TAB>attribution``) or two line-aligned plain-text files (``--src FILE --tgt FILE``).

Every line that shares the same grouping sentence (by default the *target* side, English in the
demo) goes to the same split, so a sentence with several translations can never appear both in
training and in valid/test.  Groups are ordered by a salted SHA-256 of the grouping sentence, so
the split depends only on the data and ``--seed``, not on line order, Python version or platform.

Writes ``OUT/{train,valid,test}.{SRC,TGT}`` (plain text, one sentence per line) and, when the input
has an attribution column, ``OUT/{split}.attribution`` aligned line by line; plus ``OUT/split.json``
with the counts.

Examples::

    python scripts/split_corpus.py --tsv data/tatoeba-deu-eng/deu-eng.tsv.gz --out-dir work/split
    python scripts/split_corpus.py --src my.de --tgt my.en --src-lang de --tgt-lang en --out-dir work/split
    python scripts/split_corpus.py --tsv pairs.tsv --src-col 1 --tgt-col 2 --attr-col 0 ...
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

Pair = Tuple[str, str, Optional[str]]  # (source, target, attribution or None)


class CorpusError(ValueError):
    """Unusable input; the message names the offending file (and line)."""


def _open_text(path: Path):
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="\n")
    return open(path, encoding="utf-8", newline="\n")


def _read_lines(path: Path) -> List[str]:
    try:
        with _open_text(path) as handle:
            lines = [line.rstrip("\n").rstrip("\r") for line in handle]
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path}: not UTF-8 text ({err})") from None
    # A trailing empty line (file ending in "\n\n") is not a sentence pair.
    while lines and lines[-1].strip() == "":
        lines.pop()
    if not lines:
        raise CorpusError(f"{path}: file is empty (no sentence pairs)")
    return lines


def read_tsv(path: Path, src_col: int, tgt_col: int, attr_col: int) -> List[Pair]:
    """Columns are 1-based; ``attr_col`` 0 means no attribution column."""
    pairs: List[Pair] = []
    needed = max(src_col, tgt_col, attr_col)
    for number, line in enumerate(_read_lines(path), start=1):
        fields = line.split("\t")
        if len(fields) < needed:
            raise CorpusError(
                f"{path}:{number}: expected at least {needed} tab-separated columns, found {len(fields)}"
            )
        src, tgt = fields[src_col - 1].strip(), fields[tgt_col - 1].strip()
        if not src or not tgt:
            raise CorpusError(f"{path}:{number}: empty {'source' if not src else 'target'} sentence")
        attr = fields[attr_col - 1].strip() if attr_col else None
        pairs.append((src, tgt, attr))
    return pairs


def read_parallel(src_path: Path, tgt_path: Path, attr_path: Optional[Path]) -> List[Pair]:
    src_lines, tgt_lines = _read_lines(src_path), _read_lines(tgt_path)
    attr_lines = _read_lines(attr_path) if attr_path else None
    if len(src_lines) != len(tgt_lines):
        raise CorpusError(
            f"misaligned input: {src_path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)}"
        )
    if attr_lines is not None and len(attr_lines) != len(src_lines):
        raise CorpusError(
            f"misaligned input: {attr_path} has {len(attr_lines)} lines but {src_path} has {len(src_lines)}"
        )
    pairs: List[Pair] = []
    for index, (src, tgt) in enumerate(zip(src_lines, tgt_lines, strict=True)):
        src, tgt = src.strip(), tgt.strip()
        if not src:
            raise CorpusError(f"{src_path}:{index + 1}: empty line (its pair in {tgt_path} is {tgt[:40]!r})")
        if not tgt:
            raise CorpusError(f"{tgt_path}:{index + 1}: empty line (its pair in {src_path} is {src[:40]!r})")
        pairs.append((src, tgt, attr_lines[index].strip() if attr_lines else None))
    return pairs


def _rank(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\t{key}".encode()).hexdigest()


def split_pairs(
    pairs: Sequence[Pair],
    valid_size: int,
    test_size: int,
    seed: int = 1,
    group_by: str = "tgt",
    max_pairs: int = 0,
) -> Dict[str, List[Pair]]:
    """Split into {"train", "valid", "test"}; sizes are in pairs, filled with whole groups."""
    groups: OrderedDict[str, List[Pair]] = OrderedDict()
    for pair in pairs:
        key = pair[1] if group_by == "tgt" else pair[0]
        groups.setdefault(key, []).append(pair)
    # Distinct grouping sentences in hash order; ties (impossible in practice) break on the text.
    order = sorted(groups, key=lambda k: (_rank(k, seed), k))
    if max_pairs:
        kept, total = [], 0
        for key in order:
            if total >= max_pairs:
                break
            kept.append(key)
            total += len(groups[key])
        order = kept
    total_pairs = sum(len(groups[k]) for k in order)
    if valid_size + test_size >= total_pairs:
        raise CorpusError(
            f"valid ({valid_size}) + test ({test_size}) pairs leave nothing to train on: "
            f"the corpus has {total_pairs} pairs"
        )
    result: Dict[str, List[Pair]] = {"test": [], "valid": [], "train": []}
    wanted = {"test": test_size, "valid": valid_size}
    current = iter(("test", "valid"))
    name = next(current)
    for key in order:
        while name != "train" and len(result[name]) >= wanted[name]:
            name = next(current, "train")
        result[name].extend(groups[key])
    return result


def write_split(out_dir: Path, splits: Dict[str, List[Pair]], src_lang: str, tgt_lang: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    has_attr = any(p[2] is not None for p in splits["train"])
    for name, items in splits.items():
        with open(out_dir / f"{name}.{src_lang}", "w", encoding="utf-8") as src, open(
            out_dir / f"{name}.{tgt_lang}", "w", encoding="utf-8"
        ) as tgt:
            for s, t, _ in items:
                src.write(s + "\n")
                tgt.write(t + "\n")
        attr_path = out_dir / f"{name}.attribution"
        if has_attr:
            with open(attr_path, "w", encoding="utf-8") as attr:
                for _, _, a in items:
                    attr.write((a or "") + "\n")
        elif attr_path.exists():
            attr_path.unlink()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("input (either --tsv or --src/--tgt)")
    source.add_argument("--tsv", type=Path, help="tab-separated pairs, plain or .gz")
    source.add_argument("--src-col", type=int, default=2, help="TSV column (1-based) of the source (default 2: de)")
    source.add_argument("--tgt-col", type=int, default=1, help="TSV column (1-based) of the target (default 1: en)")
    source.add_argument("--attr-col", type=int, default=3,
                        help="TSV attribution column (1-based), 0 for none (default 3; ignored if the TSV has "
                        "fewer columns and --attr-col was not given explicitly)")
    source.add_argument("--src", type=Path, help="source-side sentences, one per line")
    source.add_argument("--tgt", type=Path, help="target-side sentences, line-aligned with --src")
    source.add_argument("--attr", type=Path, help="optional attribution lines, aligned with --src")
    parser.add_argument("--src-lang", default="de", help="suffix of the source files (default de)")
    parser.add_argument("--tgt-lang", default="en", help="suffix of the target files (default en)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--valid-size", type=int, default=500, help="pairs in valid (whole groups, default 500)")
    parser.add_argument("--test-size", type=int, default=500, help="pairs in test (whole groups, default 500)")
    parser.add_argument("--max-pairs", type=int, default=0, help="use only about this many pairs (0: all)")
    parser.add_argument("--group-by", choices=("tgt", "src"), default="tgt",
                        help="side whose sentence keeps its lines together (default tgt: English)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if bool(args.tsv) == bool(args.src or args.tgt):
        parser.error("give either --tsv FILE or --src FILE --tgt FILE")
    if not args.tsv and not (args.src and args.tgt):
        parser.error("--src and --tgt go together")
    if args.src_lang == args.tgt_lang:
        parser.error("--src-lang and --tgt-lang must differ")
    for flag in ("valid_size", "test_size", "max_pairs"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0")
    args.attr_col_given = any(a == "--attr-col" or a.startswith("--attr-col=") for a in (argv or sys.argv[1:]))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.tsv:
            attr_col = args.attr_col
            if attr_col and not args.attr_col_given:
                # Two-column TSVs are fine: only use the default attribution column if it exists.
                first = _read_lines(args.tsv)[0]
                if len(first.split("\t")) < attr_col:
                    attr_col = 0
            pairs = read_tsv(args.tsv, args.src_col, args.tgt_col, attr_col)
        else:
            pairs = read_parallel(args.src, args.tgt, args.attr)
        splits = split_pairs(pairs, args.valid_size, args.test_size, args.seed, args.group_by, args.max_pairs)
    except CorpusError as err:
        print(f"split_corpus.py: error: {err}", file=sys.stderr)
        return 2
    write_split(args.out_dir, splits, args.src_lang, args.tgt_lang)
    key = 1 if args.group_by == "tgt" else 0
    counts = {
        name: {"pairs": len(items), "distinct_" + args.group_by: len({p[key] for p in items})}
        for name, items in splits.items()
    }
    with open(args.out_dir / "split.json", "w", encoding="utf-8") as handle:
        json.dump({"input": str(args.tsv or args.src), "seed": args.seed, "group_by": args.group_by,
                   "src_lang": args.src_lang, "tgt_lang": args.tgt_lang, "splits": counts}, handle, indent=2)
    summary = ", ".join(f"{n} {c['pairs']}" for n, c in counts.items())
    print(f"split {sum(len(v) for v in splits.values())} pairs ({args.src_lang}->{args.tgt_lang}, "
          f"grouped by {args.group_by} sentence): {summary} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
