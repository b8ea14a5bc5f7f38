"""Text-processing steps of the recipes, one subcommand each (``python -m deepnet_recipes.tools CMD -h``).

fetch        copy/link an archive from --data-dir, or download it (--url or --mirror), and verify its sha256
sgm          the <seg> lines of a WMT SGML or IWSLT XML file, one per line
iwslt-tags   the text lines of IWSLT's train.tags.* files (metadata lines dropped)
concat       concatenate text files (line counts are checked to match across --check-with)
tokenize     Moses-style normalization + tokenization (sacremoses), optionally lowercased, in parallel
split-every  move every N-th line pair of a parallel corpus into a second corpus (fairseq's valid split)
clean        Moses clean-corpus-n: drop pairs outside MIN..MAX tokens or with a length ratio > RATIO
spm-train    train a joint SentencePiece model
spm-encode   segment files with it (IN:OUT pairs)
spm-dict     a fairseq dictionary from a SentencePiece vocabulary
bleu         score a fairseq-generate output: tokenized BLEU (fairseq's scorer; optional compound
             splitting) and detokenized sacreBLEU with its signature
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import unicodedata
import urllib.request
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, NoReturn, Optional, Sequence, Tuple

EXIT_USAGE = 2
EXIT_CHECKSUM = 4


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"deepnet_recipes.tools: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def atomic_write_lines(path: Path, lines) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(line + "\n")
            count += 1
    os.replace(tmp, path)
    return count


def read_lines(path: Path) -> Iterator[str]:
    if not path.exists():
        fail(f"{path}: no such file")
    with open(path, encoding="utf-8", errors="replace", newline="\n") as handle:
        for line in handle:
            yield line.rstrip("\n").rstrip("\r")


# ---- fetch + checksums ----------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checksums(path: Path) -> Dict[str, str]:
    """``<sha256>  <file name>`` lines; '#' comments; a hash of '-' means "not recorded yet"."""
    table: Dict[str, str] = {}
    if not path.exists():
        fail(f"checksums file {path} does not exist", EXIT_CHECKSUM)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not (parts[0] == "-" or re.fullmatch(r"[0-9a-f]{64}", parts[0])):
            fail(f"{path}:{number}: expected '<sha256>  <name>', got {line!r}", EXIT_CHECKSUM)
        table[parts[1].lstrip("*")] = parts[0]
    return table


def cmd_fetch(args: argparse.Namespace) -> None:
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    expected = read_checksums(args.checksums).get(args.name, "-")
    if args.data_dir is not None:
        source = args.data_dir / args.name
        if not source.is_file():
            fail(f"{args.name} is not in --data-dir {args.data_dir} (download it from {args.url})")
        if out.exists() or out.is_symlink():
            out.unlink()
        out.symlink_to(source.resolve())
        origin = str(source)
    else:
        url = args.url if not args.mirror else args.mirror.rstrip("/") + "/" + args.name
        tmp = out.with_name(out.name + ".part")
        print(f"downloading {url} -> {out}", flush=True)
        try:
            with urllib.request.urlopen(url, timeout=args.timeout) as response, open(tmp, "wb") as handle:
                shutil.copyfileobj(response, handle, 1 << 20)
        except (OSError, ValueError) as err:
            tmp.unlink(missing_ok=True)
            fail(f"cannot download {url}: {err} (pre-download it and pass --data-dir, or use --mirror)")
        os.replace(tmp, out)
        origin = url
    actual = sha256_of(out)
    if expected == "-":
        if args.require_checksums:
            fail(f"{args.name}: no checksum recorded in {args.checksums} (sha256 of {origin} is {actual})",
                 EXIT_CHECKSUM)
        print(f"warning: {args.name}: no checksum recorded in {args.checksums}; sha256 {actual}  {args.name}",
              file=sys.stderr)
    elif actual != expected:
        if args.data_dir is None:
            out.unlink()
        fail(f"checksum mismatch for {args.name} ({origin}): sha256 {actual}, expected {expected} "
             f"(from {args.checksums}); the archive is corrupt, truncated or a different release", EXIT_CHECKSUM)
    else:
        print(f"{args.name}: sha256 ok")


# ---- extraction -----------------------------------------------------------------------------------
SEG = re.compile(r"<seg[^>]*>\s*(.*?)\s*</seg>", re.IGNORECASE)


def cmd_sgm(args: argparse.Namespace) -> None:
    lines = []
    for line in read_lines(args.input):
        match = SEG.search(line)
        if match:
            text = match.group(1)
            if args.ascii_apostrophe:
                text = text.replace("\u2019", "'")
            lines.append(text)
    if not lines:
        fail(f"{args.input}: no <seg> lines found")
    print(f"{args.input}: {atomic_write_lines(args.output, lines)} segments -> {args.output}")


IWSLT_META = ("<url>", "<talkid>", "<keywords>")  # fairseq's prepare-iwslt14.sh: grep -v each (anywhere in the line)
IWSLT_STRIP = ("<title>", "</title>", "<description>", "</description>")  # ... and sed -e 's/TAG//g' each


def iwslt_train_lines(lines: Iterable[str]) -> Iterator[str]:
    """fairseq's prepare-iwslt14.sh on train.tags.*: drop the lines holding <url>, <talkid> or <keywords> and
    remove the <title>/<description> tags (their text stays); every other line, <speaker>/<reviewer>/... lines
    included, is kept as it is (the IWSLT-17 script filters those; the IWSLT-14 one does not)."""
    for line in lines:
        if any(tag in line for tag in IWSLT_META):
            continue
        for tag in IWSLT_STRIP:
            line = line.replace(tag, "")
        yield line


def cmd_iwslt_tags(args: argparse.Namespace) -> None:
    kept = iwslt_train_lines(read_lines(args.input))
    print(f"{args.input}: {atomic_write_lines(args.output, kept)} lines -> {args.output}")


def cmd_concat(args: argparse.Namespace) -> None:
    def lines():
        for path in args.inputs:
            yield from read_lines(path)
    count = atomic_write_lines(args.output, lines())
    print(f"{count} lines -> {args.output}")


# ---- tokenization ---------------------------------------------------------------------------------
_TOK = {}


def _tokenize_init(lang: str, lowercase: bool, aggressive: bool, normalize: bool, non_printing: bool) -> None:
    import sacremoses

    _TOK["norm"] = sacremoses.MosesPunctNormalizer(lang=lang) if normalize else None
    _TOK["tok"] = sacremoses.MosesTokenizer(lang=lang)
    _TOK["opts"] = (lowercase, aggressive, non_printing)


def _remove_non_printing(text: str) -> str:
    """remove-non-printing-char.perl: every \\p{C} character becomes a space."""
    return "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)


def _tokenize_line(line: str) -> str:
    """One line through the Moses steps fairseq's prepare scripts pipe it through, in their order:
    [normalize-punctuation.perl -l L] [| remove-non-printing-char.perl] | tokenizer.perl [-a] -l L [| lowercase.perl].
    tokenizer.perl escapes & | < > ' " [ ] by default (&amp; ... &#93;), so this does too."""
    lowercase, aggressive, non_printing = _TOK["opts"]
    text = _TOK["norm"].normalize(line) if _TOK["norm"] is not None else line
    if non_printing:
        text = _remove_non_printing(text)
    text = _TOK["tok"].tokenize(text, aggressive_dash_splits=aggressive, escape=True, return_str=True)
    text = " ".join(text.split())
    return text.lower() if lowercase else text


def cmd_tokenize(args: argparse.Namespace) -> None:
    try:
        import sacremoses  # noqa: F401
    except ImportError:
        fail("python module sacremoses is missing: pip install sacremoses (it is in requirements.txt)", 5)
    lines = list(read_lines(args.input))
    if args.workers > 1 and len(lines) > 10000:
        import multiprocessing

        init = (args.lang, args.lowercase, args.aggressive, args.normalize_punctuation, args.remove_non_printing)
        with multiprocessing.Pool(args.workers, _tokenize_init, init) as pool:
            out = list(pool.imap(_tokenize_line, lines, chunksize=2000))
    else:
        _tokenize_init(args.lang, args.lowercase, args.aggressive, args.normalize_punctuation,
                       args.remove_non_printing)
        out = [_tokenize_line(line) for line in lines]
    print(f"{args.input}: {atomic_write_lines(args.output, out)} lines tokenized ({args.lang}) -> {args.output}")


def detokenize_lines(lines: List[str], lang: str) -> List[str]:
    import sacremoses

    detok = sacremoses.MosesDetokenizer(lang=lang)
    return [detok.detokenize(line.split()) for line in lines]


# ---- parallel-corpus filters ----------------------------------------------------------------------
def _pairs(src: Path, tgt: Path) -> List[tuple]:
    a, b = list(read_lines(src)), list(read_lines(tgt))
    if len(a) != len(b):
        fail(f"misaligned corpus: {src} has {len(a)} lines, {tgt} has {len(b)}")
    return list(zip(a, b, strict=True))


def cmd_split_every(args: argparse.Namespace) -> None:
    pairs = _pairs(args.src, args.tgt)
    keep = [p for i, p in enumerate(pairs, start=1) if i % args.every != 0]
    moved = [p for i, p in enumerate(pairs, start=1) if i % args.every == 0]
    for out_prefix, items in ((args.rest_out, keep), (args.every_out, moved)):
        atomic_write_lines(Path(f"{out_prefix}.{args.src_lang}"), (p[0] for p in items))
        atomic_write_lines(Path(f"{out_prefix}.{args.tgt_lang}"), (p[1] for p in items))
    print(f"{len(pairs)} pairs: every {args.every}th ({len(moved)}) -> {args.every_out}, "
          f"{len(keep)} -> {args.rest_out}")


def clean_pairs(pairs, ratio: float, min_len: int, max_len: int):
    for src, tgt in pairs:
        a, b = src.split(), tgt.split()
        if not (min_len <= len(a) <= max_len and min_len <= len(b) <= max_len):
            continue
        if ratio > 0 and (len(a) / len(b) > ratio or len(b) / len(a) > ratio):
            continue
        yield " ".join(a), " ".join(b)


def cmd_clean(args: argparse.Namespace) -> None:
    pairs = _pairs(args.src, args.tgt)
    kept = list(clean_pairs(pairs, args.ratio, args.min, args.max))
    atomic_write_lines(args.src_out, (p[0] for p in kept))
    atomic_write_lines(args.tgt_out, (p[1] for p in kept))
    print(f"clean (ratio {args.ratio}, length {args.min}-{args.max}): kept {len(kept)} of {len(pairs)} pairs")


# ---- sentencepiece (also the demo's scripts/spm_train.py) ---------------------------------------------
def train_sentencepiece(inputs: Sequence[Path], model_prefix: Path, vocab_size: int, model_type: str,
                        character_coverage: float = 1.0, input_sentence_size: int = 10_000_000,
                        threads: int = 1) -> int:
    """Train one joint SentencePiece model on ``inputs``; returns its number of pieces.

    The vocabulary size is a soft limit (a small corpus gets a smaller vocabulary, not an error), and
    SentencePiece's own <s>/</s> ids are disabled: fairseq's dictionary adds <s>/<pad>/</s>/<unk> itself.
    """
    import sentencepiece as spm

    for path in inputs:
        if not path.exists() or path.stat().st_size == 0:
            fail(f"{path}: missing or empty")
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=[str(p) for p in inputs], model_prefix=str(model_prefix), vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True, hard_vocab_limit=False,
        bos_id=-1, eos_id=-1, unk_id=0, num_threads=threads, minloglevel=2,
    )
    with open(f"{model_prefix}.vocab", encoding="utf-8") as vocab:
        return sum(1 for _ in vocab)


def encode_files(model: Path, pairs: Sequence[str]) -> None:
    """Write the pieces of each line of IN, space-separated, to OUT for every ``IN:OUT`` in ``pairs`` (what
    fairseq-preprocess reads; ``fairseq-generate --remove-bpe sentencepiece`` undoes it)."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(model))
    for spec in pairs:
        src, sep, dst = spec.partition(":")
        if not sep:
            fail(f"spm-encode wants IN:OUT, got {spec!r}")
        lines = (" ".join(processor.encode(line, out_type=str)) for line in read_lines(Path(src)))
        print(f"{src}: {atomic_write_lines(Path(dst), lines)} lines -> {dst}")


def cmd_spm_train(args: argparse.Namespace) -> None:
    pieces = train_sentencepiece(args.inputs, args.model_prefix, args.vocab_size, args.model_type,
                                 args.character_coverage, args.input_sentence_size, args.threads)
    print(f"sentencepiece {args.model_type}: {pieces} pieces -> {args.model_prefix}.model")


def cmd_spm_encode(args: argparse.Namespace) -> None:
    encode_files(args.model, args.pairs)


def cmd_spm_dict(args: argparse.Namespace) -> None:
    entries = []
    for line in read_lines(args.vocab):
        piece = line.split("\t")[0]
        if piece in ("<unk>", "<s>", "</s>", "<pad>") or not piece.strip():
            continue
        entries.append(f"{piece} 1")
    print(f"{atomic_write_lines(args.output, entries)} entries -> {args.output}")


# ---- scoring --------------------------------------------------------------------------------------
def compound_split(line: str) -> str:
    """Split hyphenated compounds as the WMT En-De tradition (fairseq's compound_split_bleu) does:
    ``a-b`` -> ``a ##AT##-##AT## b`` on both hypothesis and reference, so a hyphenated compound counts
    as three tokens."""
    return re.sub(r"(\S)-(\S)", r"\1 ##AT##-##AT## \2", line)


def tokenized_bleu(hyps: List[str], refs: List[str]):
    """fairseq's built-in BLEU (fairseq-score / fairseq-generate's BLEU4 line): corpus BLEU-4 over
    whitespace tokens, case-sensitive, no smoothing, brevity penalty exp(1 - r/c)."""
    import sacrebleu

    metric = sacrebleu.BLEU(tokenize="none", smooth_method="none", force=True)
    return metric.corpus_score(hyps, [refs])


FAIRSEQ_BLEU = re.compile(r"^Generate \S+ with beam=\d+: BLEU4? = ([0-9.]+)", re.MULTILINE)


def fairseq_bleu(generate_output: Path) -> Tuple[float, str]:
    """(score, line) of fairseq-generate's own BLEU line: fairseq's built-in BLEU-4 on the ``--remove-bpe``
    output against the binarized (equally --remove-bpe'd) test references, the paper's WMT/IWSLT metric."""
    text = generate_output.read_text(encoding="utf-8", errors="replace")
    match = FAIRSEQ_BLEU.search(text)
    if match is None:
        fail(f"{generate_output}: no 'Generate ... BLEU4 = ' line (was fairseq-generate run with --scoring bleu?)")
    return float(match.group(1)), match.group(0)


def hypotheses(generate_output: Path, expected: int) -> List[str]:
    """The hypotheses of a fairseq-generate output in corpus order (:mod:`deepnet_fairseq.evaluation`, imported
    here only: importing the plugin package loads fairseq)."""
    from deepnet_fairseq.evaluation import MissingHypotheses, read_hypotheses

    try:
        return read_hypotheses(generate_output, expected)
    except MissingHypotheses as err:
        fail(str(err))


def cmd_bleu(args: argparse.Namespace) -> None:
    result: Dict[str, object] = {"name": args.name, "generate_output": str(args.generate_output)}
    if args.primary == "fairseq_bleu" or args.ref_tok:
        score, line = fairseq_bleu(args.generate_output)
        result.update(fairseq_bleu=score, fairseq_bleu_line=line,
                      fairseq_bleu_kind="fairseq-generate --remove-bpe: built-in tokenized BLEU-4 (the paper's)")
        print(f"[{args.name}] fairseq-generate BLEU: {line}")
    if args.ref_tok:
        refs = list(read_lines(args.ref_tok))
        hyps = hypotheses(args.generate_output, len(refs))
        score = tokenized_bleu(hyps, refs)
        result.update(tok_bleu=round(score.score, 2), tok_bleu_line=str(score),
                      tok_bleu_kind="tokenized BLEU-4 against the tokenized reference file")
        print(f"[{args.name}] tokenized BLEU (reference file): {score}")
        if args.compound_split:
            split = tokenized_bleu([compound_split(h) for h in hyps], [compound_split(r) for r in refs])
            result.update(compound_split_bleu=round(split.score, 2), compound_split_bleu_line=str(split),
                          compound_split_bleu_kind="extra, not the paper's metric: tokenized BLEU-4 with "
                                                   "##AT##-##AT## compound splitting")
            print(f"[{args.name}] extra: compound-split tokenized BLEU: {split}")
    if args.ref_raw:
        refs = list(read_lines(args.ref_raw))
        hyps = hypotheses(args.generate_output, len(refs))
        if args.detok_lang:
            hyps = detokenize_lines(hyps, args.detok_lang)
        if args.hyp_out:
            atomic_write_lines(args.hyp_out, hyps)
        from deepnet_fairseq.evaluation import sacrebleu_corpus

        score, signature = sacrebleu_corpus(hyps, refs, lowercase=args.lowercase)
        result.update(sacrebleu=round(score.score, 2), sacrebleu_line=str(score), signature=signature)
        print(f"[{args.name}] sacreBLEU: {score}\n[{args.name}] signature: {signature}")
    if args.primary not in result:
        fail(f"--primary {args.primary}: not computed (give --ref-tok for tok_bleu, --ref-raw for sacrebleu)",
             EXIT_USAGE)
    result["bleu"] = result[args.primary]
    result["primary"] = args.primary
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


# ---- CLI ------------------------------------------------------------------------------------------
def add_file_command(sub, name: str, func, *paths: str) -> argparse.ArgumentParser:
    """Subcommand ``name`` (runs ``func``) with the positional file arguments ``paths``."""
    p = sub.add_parser(name)
    for path in paths:
        p.add_argument(path, type=Path)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deepnet_recipes.tools", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch")
    p.add_argument("--name", required=True, help="archive file name (also its name under --data-dir/--mirror)")
    p.add_argument("--url", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--checksums", type=Path, required=True)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--mirror")
    p.add_argument("--require-checksums", action="store_true")
    p.add_argument("--timeout", type=float, default=60)
    p.set_defaults(func=cmd_fetch)

    p = add_file_command(sub, "sgm", cmd_sgm, "input", "output")
    p.add_argument("--ascii-apostrophe", action="store_true", help="map U+2019 to ' (as fairseq's IWSLT script)")

    add_file_command(sub, "iwslt-tags", cmd_iwslt_tags, "input", "output")

    p = sub.add_parser("concat")
    p.add_argument("output", type=Path)
    p.add_argument("inputs", type=Path, nargs="+")
    p.set_defaults(func=cmd_concat)

    p = add_file_command(sub, "tokenize", cmd_tokenize, "input", "output")
    p.add_argument("--lang", required=True)
    p.add_argument("--lowercase", action="store_true")
    p.add_argument("--aggressive", action="store_true", help="split hyphens as @-@ (tokenizer.perl -a)")
    p.add_argument("--normalize-punctuation", action="store_true", help="normalize-punctuation.perl first")
    p.add_argument("--remove-non-printing", action="store_true", help="remove-non-printing-char.perl first")
    p.add_argument("--workers", type=int, default=1)

    p = sub.add_parser("split-every")
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--tgt", type=Path, required=True)
    p.add_argument("--src-lang", required=True)
    p.add_argument("--tgt-lang", required=True)
    p.add_argument("--every", type=int, required=True)
    p.add_argument("--every-out", required=True, help="prefix for the moved pairs (PREFIX.LANG)")
    p.add_argument("--rest-out", required=True, help="prefix for the remaining pairs")
    p.set_defaults(func=cmd_split_every)

    p = sub.add_parser("clean")
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--tgt", type=Path, required=True)
    p.add_argument("--src-out", type=Path, required=True)
    p.add_argument("--tgt-out", type=Path, required=True)
    p.add_argument("--ratio", type=float, default=1.5, help="0 disables the ratio filter")
    p.add_argument("--min", type=int, default=1)
    p.add_argument("--max", type=int, default=250)
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("spm-train")
    p.add_argument("--inputs", type=Path, nargs="+", required=True)
    p.add_argument("--model-prefix", type=Path, required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument("--input-sentence-size", type=int, default=10_000_000)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_spm_train)

    p = sub.add_parser("spm-encode")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("pairs", nargs="+", metavar="IN:OUT")
    p.set_defaults(func=cmd_spm_encode)

    add_file_command(sub, "spm-dict", cmd_spm_dict, "vocab", "output")

    p = sub.add_parser("bleu")
    p.add_argument("--generate-output", type=Path, required=True, help="stdout of fairseq-generate")
    p.add_argument("--ref-tok", type=Path, help="tokenized reference: scores fairseq's tokenized BLEU")
    p.add_argument("--compound-split", action="store_true", help="##AT##-##AT## compound splitting (WMT En-De)")
    p.add_argument("--ref-raw", type=Path, help="raw reference: scores detokenized sacreBLEU")
    p.add_argument("--detok-lang", help="Moses-detokenize the hypotheses first (they were Moses-tokenized)")
    p.add_argument("--hyp-out", type=Path, help="write the (detokenized) hypotheses here")
    p.add_argument("--lowercase", action="store_true", help="case-insensitive sacreBLEU (-lc)")
    p.add_argument("--primary", choices=("fairseq_bleu", "tok_bleu", "sacrebleu"), default="fairseq_bleu",
                   help="the number copied to 'bleu' (default: fairseq-generate's own BLEU line)")
    p.add_argument("--json", type=Path)
    p.add_argument("--name", default="")
    p.set_defaults(func=cmd_bleu)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
