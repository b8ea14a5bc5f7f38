"""WMT-17 English-German (the paper's Table 1): prepare, train, evaluate.

    scripts/wmt17/prepare.sh [--out-dir DIR] [--data-dir ARCHIVES] [--valid {train100,newstest2013}] ...
    scripts/wmt17/train.sh SCHEME ENC_LAYERS DEC_LAYERS [GPUS [UPDATE_FREQ|auto]] [overrides] [-- fairseq flags]
    scripts/wmt17/evaluate.sh RUN_DIR [--average N] ...

Data as fairseq's prepare-wmt14en2de.sh without --icml17 ("wmt17_en_de"): training = Europarl v7 +
Common Crawl + News Commentary v12, test = newstest2014 (full, the "deen" SGML files), valid = every
100th training pair (default; ``--valid newstest2013`` uses the official dev set instead). Moses-style
normalization and tokenization (sacremoses, hyphens split as @-@ like tokenizer.perl -a), a joint
SentencePiece BPE model (32k), pairs cleaned to 1-250 pieces with length ratio <= 1.5, binarized with
``fairseq-preprocess --joined-dictionary``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from deepnet_recipes.common import REPO, Runner, Step, cli, fetch_step, python_tool, start_prepare, tool_env
from deepnet_recipes.training import TABLE1_SCHEMES as SCHEMES
from deepnet_recipes.training import BilingualRecipe

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
TARGET_TOKENS = 128 * 4096  # admin-torch's "huge batch" = DeepNet's WMT-17 setting (proxy, unconfirmed)
MAX_TOKENS = 4096
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
        steps.append(Step(f"test-{lang}", python_tool("sgm", orig / f"test-full/newstest2014-deen-{kind}.{lang}.sgm",
                                                      text / f"test.raw.{lang}"), env=env))
        if args.valid == "newstest2013":
            steps.append(Step(f"valid-{lang}", python_tool("concat", text / f"valid.raw.{lang}",
                                                           orig / f"dev/newstest2013.{lang}"), env=env))
    splits = ["train", "valid", "test"] if args.valid == "newstest2013" else ["train", "test"]
    for split in splits:
        for lang in (SRC, TGT):
            steps.append(Step(f"tokenize-{split}-{lang}", python_tool(
                "tokenize", text / f"{split}.raw.{lang}", text / f"{split}.tok.{lang}", "--lang", lang,
                "--aggressive", "--workers", args.workers), env=env))
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
    parser.add_argument("--vocab-size", type=int, default=32000, help="joint SentencePiece BPE size (default 32000)")
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
def recipe_flags(scheme: str, encoder_layers: int, decoder_layers: int) -> List[str]:
    flags = [
        "--task", "translation", "--source-lang", SRC, "--target-lang", TGT,
        "--arch", "deepnet_transformer",  # base: 512 / FFN 2048 / 8 heads [paper text]
        "--residual-scheme", scheme, "--encoder-layers", str(encoder_layers), "--decoder-layers", str(decoder_layers),
        "--share-all-embeddings",  # [proxy: admin-torch]
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--adam-eps", "1e-8", "--clip-norm", "0.0",
        "--lr", "1.5e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4000", "--warmup-init-lr", "1e-7",
        "--dropout", "0.4", "--weight-decay", "1e-4",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--max-tokens", str(MAX_TOKENS), "--update-freq", "1", "--max-update", "100000",
        "--fp16",  # mixed precision [paper text]
        "--stop-on-divergence-patience", "20",  # recipe choice: record divergence (exit 3) instead of crashing
        "--keep-last-epochs", "10",  # the 10 epoch checkpoints that evaluate.sh averages [proxy: admin-torch]
        "--seed", "1", "--log-format", "json", "--log-interval", "100", "--no-progress-bar",
    ]
    if scheme == "rezero":
        flags.append("--allow-rezero-fp16")  # Table 1 ran ReZero in fp16 (and saw it diverge at 18L) [paper text]
    return flags


RECIPE = BilingualRecipe(
    name="wmt17", doc=__doc__, src=SRC, tgt=TGT, schemes=SCHEMES, max_tokens=MAX_TOKENS, target_tokens=TARGET_TOKENS,
    default_data=default_data(), flags=recipe_flags, gpus=8,
    update_freq_help="gradient accumulation; 'auto' (default) keeps the 128 x 4096-token global batch",
    # evaluate: average the last 10 epoch checkpoints, beam 4, lenpen 0.6, compound-split tokenized BLEU
    average=10, beam=4, lenpen=0.6, eval_tools=["fairseq-generate", "deepnet-average-checkpoints"],
    bleu_ref_tok_flags=["--compound-split"],
)
train = RECIPE.train
evaluate = RECIPE.evaluate


ACTIONS = {"prepare": prepare, "train": train, "evaluate": evaluate}


if __name__ == "__main__":
    sys.exit(cli(__doc__, ACTIONS))
