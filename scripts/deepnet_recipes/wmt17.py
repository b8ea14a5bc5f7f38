"""WMT-17 English-German (the paper's Table 1): prepare, train, evaluate.

    scripts/wmt17/prepare.sh [--out-dir DIR] [--data-dir ARCHIVES] [--valid {train100,newstest2013}] ...
    scripts/wmt17/train.sh SCHEME ENC_LAYERS DEC_LAYERS [GPUS [UPDATE_FREQ|auto]] [overrides] [-- fairseq flags]
    scripts/wmt17/evaluate.sh RUN_DIR [--average N] ...

Data step for step as fairseq's prepare-wmt14en2de.sh without --icml17 (deviations: docs/recipes.md):
training = Europarl v7 + Common Crawl + News Commentary v12, punctuation-normalized, non-printing characters
removed, Moses-tokenized with hyphens split as @-@ (tokenizer.perl -a, escaping on); test = newstest2014 (the
full "deen" SGML files), only tokenized; valid = every 100th training pair (default; ``--valid newstest2013``
uses the official dev set instead); a joint SentencePiece BPE model (40k; fairseq: subword-nmt, 40k merges);
train/valid cleaned to 1-250 pieces with length ratio <= 1.5; ``fairseq-preprocess --joined-dictionary``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from deepnet_recipes.common import (
    REPO,
    Runner,
    Step,
    cli,
    fetch_step,
    python_tool,
    recipe_parser,
    start_prepare,
    tool_env,
)
from deepnet_recipes.paper import FIG7_DEPTH, TABLE5_WMT17, Hparams, fig7_grid, wmt17_hparams
from deepnet_recipes.paper import TABLE1_SCHEMES as SCHEMES
from deepnet_recipes.training import (
    BilingualRecipe,
    TrainPlan,
    add_train_overrides,
    resolve_plan_numbers,
    run_training,
    split_extra,
)

HERE = Path(__file__).resolve().parent.parent / "wmt17"
CHECKSUMS = HERE / "checksums.sha256"
SRC, TGT = "en", "de"
ARCHIVES = {  # name: URL (the URLs of fairseq's prepare-wmt14en2de.sh)
    "training-parallel-europarl-v7.tgz": "http://statmt.org/wmt13/training-parallel-europarl-v7.tgz",
    "training-parallel-commoncrawl.tgz": "http://statmt.org/wmt13/training-parallel-commoncrawl.tgz",
    "training-parallel-nc-v12.tgz": "http://data.statmt.org/wmt17/translation-task/training-parallel-nc-v12.tgz",
    "dev.tgz": "http://data.statmt.org/wmt17/translation-task/dev.tgz",
    "test-full.tgz": "http://statmt.org/wmt14/test-full.tgz",
}
CORPORA = ["training/europarl-v7.de-en", "commoncrawl.de-en", "training/news-commentary-v12.de-en"]
DEPTHS = [6, 18, 50, 100]
TARGET_TOKENS = TABLE5_WMT17.batch_tokens  # 128 x 4096 [Table 5]
MAX_TOKENS = 4096  # per GPU per step; update-freq makes up the rest of the global batch
DEFAULT_OUT = REPO / "runs" / "recipes" / "wmt17_en_de"


def default_data() -> Path:
    return DEFAULT_OUT / "bin"


# ---- prepare --------------------------------------------------------------------------------------
def prepare_steps(args: argparse.Namespace) -> List[Step]:
    out: Path = args.out_dir.resolve()
    raw, orig, text, bin_dir = out / "raw", out / "orig", out / "text", out / "bin"
    env = tool_env()
    names = [n for n in ARCHIVES if n != "dev.tgz" or args.valid == "newstest2013"]
    steps = [fetch_step(n, ARCHIVES[n], raw, args, CHECKSUMS) for n in names]
    steps += [Step(f"extract-{n}", ["tar", "-xzf", str(raw / n), "-C", str(orig)]) for n in names]
    steps.insert(len(names), Step("mkdir", ["mkdir", "-p", str(orig), str(text), str(bin_dir)], always=True))
    for lang in (SRC, TGT):
        steps.append(Step(f"concat-train-{lang}", python_tool("concat", text / f"train.raw.{lang}",
                                                              *[orig / f"{c}.{lang}" for c in CORPORA]), env=env))
        kind = "src" if lang == SRC else "ref"
        # fairseq: grep '<seg id' | sed (strip the tags) | sed "s/’/'/g"
        steps.append(Step(f"test-{lang}", python_tool("sgm", orig / f"test-full/newstest2014-deen-{kind}.{lang}.sgm",
                                                      text / f"test.raw.{lang}", "--ascii-apostrophe"), env=env))
        if args.valid == "newstest2013":
            steps.append(Step(f"valid-{lang}", python_tool("concat", text / f"valid.raw.{lang}",
                                                           orig / f"dev/newstest2013.{lang}"), env=env))
    splits = ["train", "valid", "test"] if args.valid == "newstest2013" else ["train", "test"]
    for split in splits:
        # fairseq: train = normalize-punctuation.perl | remove-non-printing-char.perl | tokenizer.perl -a;
        # test = tokenizer.perl -a only (no normalization: it would change the tokenized reference)
        clean_text = ["--normalize-punctuation", "--remove-non-printing"] if split == "train" else []
        for lang in (SRC, TGT):
            steps.append(Step(f"tokenize-{split}-{lang}", python_tool(
                "tokenize", text / f"{split}.raw.{lang}", text / f"{split}.tok.{lang}", "--lang", lang,
                *clean_text, "--aggressive", "--workers", args.workers), env=env))
    if args.valid == "train100":
        steps.append(Step("split-valid", python_tool(
            "split-every", "--src", text / f"train.tok.{SRC}", "--tgt", text / f"train.tok.{TGT}",
            "--src-lang", SRC, "--tgt-lang", TGT, "--every", 100,
            "--every-out", text / "valid.tok", "--rest-out", text / "train.tok.rest"), env=env))
        train_tok = "train.tok.rest"
    else:
        train_tok = "train.tok"
    steps.append(Step("spm-train", python_tool(
        "spm-train", "--inputs", text / f"{train_tok}.{SRC}", text / f"{train_tok}.{TGT}",
        "--model-prefix", out / "spm" / "spm", "--vocab-size", args.vocab_size, "--model-type", "bpe",
        "--input-sentence-size", args.spm_sentences, "--threads", args.workers), env=env))
    pairs = []
    for split, name in (("train", train_tok), ("valid", "valid.tok"), ("test", "test.tok")):
        for lang in (SRC, TGT):
            pairs.append(f"{text / f'{name}.{lang}'}:{text / f'{split}.spm.{lang}'}")
    steps.append(Step("spm-encode", python_tool("spm-encode", "--model", out / "spm" / "spm.model", *pairs), env=env))
    for split in ("train", "valid"):
        steps.append(Step(f"clean-{split}", python_tool(
            "clean", "--src", text / f"{split}.spm.{SRC}", "--tgt", text / f"{split}.spm.{TGT}",
            "--src-out", text / f"{split}.clean.{SRC}", "--tgt-out", text / f"{split}.clean.{TGT}",
            "--ratio", 1.5, "--min", 1, "--max", 250), env=env))
    steps.append(Step("binarize", [
        "fairseq-preprocess", "--source-lang", SRC, "--target-lang", TGT, "--joined-dictionary",
        "--trainpref", str(text / "train.clean"), "--validpref", str(text / "valid.clean"),
        "--testpref", str(text / "test.spm"), "--destdir", str(bin_dir), "--workers", str(args.workers)],
        log=out / "preprocess.log"))
    return steps


def prepare_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--valid", choices=("train100", "newstest2013"), default="train100",
                        help="validation set: every 100th training pair (fairseq's script; default) or newstest2013")
    parser.add_argument("--vocab-size", type=int, default=40000,
                        help="joint SentencePiece BPE size (default 40000, the size of fairseq's 40k BPE merges)")
    parser.add_argument("--spm-sentences", type=int, default=10_000_000,
                        help="sentences sampled to train SentencePiece (default 10M)")


def prepare(argv: Optional[Sequence[str]] = None) -> int:
    args, out = start_prepare(argv, __doc__, DEFAULT_OUT, CHECKSUMS, ["sacremoses", "sentencepiece"], prepare_options)
    runner = Runner(out / ".stamps", args.dry_run, "wmt17/prepare.sh")
    runner.run_all(prepare_steps(args))
    if not args.dry_run:
        text = out / "text"
        meta = {"recipe": "wmt17", "src": SRC, "tgt": TGT, "ref_tok": str(text / f"test.tok.{TGT}"),
                "ref_raw": str(text / f"test.raw.{TGT}"), "spm_model": str(out / "spm" / "spm.model"),
                "valid": args.valid, "vocab_size": args.vocab_size}
        (out / "bin" / "recipe.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"[wmt17/prepare.sh] done: binarized data in {out / 'bin'}")
    return 0


# ---- train, evaluate ------------------------------------------------------------------------------
def recipe_flags(scheme: str, encoder_layers: int, decoder_layers: int,
                 hparams: Optional[Hparams] = None) -> List[str]:
    """fairseq-train flags: Table 5's column for ``scheme`` (or ``hparams``, e.g. a Fig. 7 / Table 6 point)."""
    hp = hparams or wmt17_hparams(scheme)
    flags = [
        "--task", "translation", "--source-lang", SRC, "--target-lang", TGT,
        "--arch", "deepnet_transformer", "--residual-scheme", scheme,
        "--encoder-layers", str(encoder_layers), "--decoder-layers", str(decoder_layers),
        *hp.flags(),  # {hp.table} of the paper
        "--share-all-embeddings",  # joined dictionary [recipe choice]
        "--max-tokens", str(MAX_TOKENS), "--update-freq", "1",
        "--fp16",  # mixed precision [paper text]
        "--stop-on-divergence-patience", "20",  # recipe choice: record divergence (exit 3) instead of crashing
        "--keep-last-epochs", "10",  # the 10 epoch checkpoints evaluate.sh may average [recipe choice]
        "--seed", "1", "--log-format", "json", "--log-interval", "100", "--no-progress-bar",
    ]
    if scheme == "rezero":
        flags.append("--allow-rezero-fp16")  # Table 1 ran ReZero in fp16 (and saw it diverge at 18L) [paper text]
    return flags


def fig7(argv: Optional[Sequence[str]] = None) -> int:
    """Fig. 7 (Table 6): 18L-18L models with lr {5e-4, 1e-3, 1.5e-3}, batch {64, 128, 256} x 4096 and size
    {512, 768, 1024}, one factor varied at a time around Table 6's defaults (7 runs per scheme)."""
    argv, extra = split_extra(argv)
    parser = recipe_parser("fig7.sh", fig7.__doc__)
    parser.add_argument("gpus", type=int, nargs="?", default=8, help="GPUs per run (default 8)")
    parser.add_argument("--schemes", default="deepnorm", help="comma-separated (default deepnorm)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "recipes" / "wmt17_fig7",
                        help="one run directory per (scheme, setting) under here")
    add_train_overrides(parser)
    args = parser.parse_args(argv)
    schemes = [s for s in args.schemes.split(",") if s]
    if not schemes:
        parser.error("--schemes is empty")
    if args.save_dir is not None:
        parser.error("--save-dir: fig7.sh names one run directory per setting; use --out DIR")
    code = 0
    for scheme in schemes:
        for name, hp in fig7_grid():
            max_tokens, update_freq = resolve_plan_numbers(parser, args, args.gpus, "auto", MAX_TOKENS,
                                                           hp.batch_tokens)
            plan = TrainPlan(
                recipe="wmt17", data=(args.data or default_data()).resolve(),
                save_dir=(args.out / f"{scheme}-{FIG7_DEPTH}L-{FIG7_DEPTH}L-{name}").resolve(), scheme=scheme,
                encoder_layers=FIG7_DEPTH, decoder_layers=FIG7_DEPTH, gpus=args.gpus, max_tokens=max_tokens,
                update_freq=update_freq, target_tokens=hp.batch_tokens,
                flags=recipe_flags(scheme, FIG7_DEPTH, FIG7_DEPTH, hp), info={"fig7": name, "table": hp.table},
            )
            code = max(code, run_training(plan, args, extra, "wmt17/fig7.sh"))
    return code


RECIPE = BilingualRecipe(
    name="wmt17", doc=__doc__, src=SRC, tgt=TGT, schemes=SCHEMES, max_tokens=MAX_TOKENS, target_tokens=TARGET_TOKENS,
    default_data=default_data(), flags=recipe_flags, gpus=8,
    update_freq_help="gradient accumulation; 'auto' (default) keeps the 128 x 4096-token global batch",
    # evaluate: the paper states none of these [recipe choice, from admin-torch's eval_wmt_en-de.sh]: average the
    # last 10 epoch checkpoints, beam 4, lenpen 0.6; primary = fairseq-generate's BLEU (compound split: an extra)
    average=10, beam=4, lenpen=0.6, eval_tools=["fairseq-generate", "deepnet-average-checkpoints"],
    bleu_ref_tok_flags=["--compound-split"],
)
train = RECIPE.train
evaluate = RECIPE.evaluate


ACTIONS = {"prepare": prepare, "train": train, "evaluate": evaluate, "fig7": fig7}


if __name__ == "__main__":
    sys.exit(cli(__doc__, ACTIONS))
