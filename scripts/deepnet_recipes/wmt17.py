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

from deepnet_recipes.common import (
    REPO,
    USER_DIR,
    Runner,
    Step,
    add_common_args,
    add_download_args,
    cli,
    fetch_step,
    python_tool,
    require_tools,
    tool_env,
)
from deepnet_recipes.training import (
    TrainPlan,
    add_eval_args,
    add_train_overrides,
    checkpoint_step,
    data_meta,
    default_run_dir,
    resolve_plan_numbers,
    run_info,
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
SCHEMES = ["post-ln", "ds-init", "admin", "rezero", "r-fixup", "t-fixup", "pre-ln", "dlcl", "normformer", "deepnorm"]
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


def prepare(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="prepare.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    parser.add_argument("--valid", choices=("train100", "newstest2013"), default="train100",
                        help="validation set: every 100th training pair (fairseq's script; default) or newstest2013")
    parser.add_argument("--vocab-size", type=int, default=32000, help="joint SentencePiece BPE size (default 32000)")
    parser.add_argument("--spm-sentences", type=int, default=10_000_000,
                        help="sentences sampled to train SentencePiece (default 10M)")
    add_download_args(parser, CHECKSUMS)
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.vocab_size < 100 or args.workers < 1:
        parser.error("--vocab-size must be >= 100 and --workers >= 1")
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir}: not a directory")
    out = args.out_dir.resolve()
    if not args.dry_run:
        require_tools(["fairseq-preprocess", "tar"], ["sacremoses", "sentencepiece"])
        out.mkdir(parents=True, exist_ok=True)
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


# ---- train ----------------------------------------------------------------------------------------
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


def train(argv: Optional[Sequence[str]] = None) -> int:
    argv, extra = split_extra(argv)
    parser = argparse.ArgumentParser(prog="train.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scheme", help=f"residual scheme ({', '.join(SCHEMES)}; any --residual-scheme name)")
    parser.add_argument("encoder_layers", type=int)
    parser.add_argument("decoder_layers", type=int)
    parser.add_argument("gpus", type=int, nargs="?", default=8, help="GPUs (default 8)")
    parser.add_argument("update_freq", nargs="?", default="auto",
                        help="gradient accumulation; 'auto' (default) keeps the 128 x 4096-token global batch")
    add_train_overrides(parser)
    args = parser.parse_args(argv)
    if args.encoder_layers < 1 or args.decoder_layers < 1:
        parser.error("encoder and decoder layers must be positive integers")
    max_tokens, update_freq = resolve_plan_numbers(parser, args, args.gpus, args.update_freq, MAX_TOKENS,
                                                   TARGET_TOKENS)
    name = f"{args.scheme}-{args.encoder_layers}L-{args.decoder_layers}L"
    plan = TrainPlan(
        recipe="wmt17", data=(args.data or default_data()).resolve(),
        save_dir=(args.save_dir or default_run_dir("wmt17", name)).resolve(), scheme=args.scheme,
        encoder_layers=args.encoder_layers, decoder_layers=args.decoder_layers, gpus=args.gpus,
        max_tokens=max_tokens, update_freq=update_freq, target_tokens=TARGET_TOKENS,
        flags=recipe_flags(args.scheme, args.encoder_layers, args.decoder_layers),
    )
    return run_training(plan, args, extra, "wmt17/train.sh")


# ---- evaluate -------------------------------------------------------------------------------------
def evaluate(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="evaluate.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser, average=10)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--lenpen", type=float, default=0.6)
    args = parser.parse_args(argv)
    save_dir = args.save_dir.resolve()
    args.save_dir = save_dir
    if not args.dry_run and not save_dir.is_dir():
        parser.error(f"{save_dir}: no such run directory")
    data = (args.data or Path(run_info(save_dir).get("data", default_data()))).resolve()
    if args.dry_run and not (data / "recipe.json").exists():
        text = data.parent / "text"
        meta = {"ref_tok": str(text / f"test.tok.{TGT}"), "ref_raw": str(text / f"test.raw.{TGT}")}
    else:
        meta = data_meta(data)
    if not args.dry_run:
        require_tools(["fairseq-generate", "deepnet-average-checkpoints"], ["sacrebleu", "sacremoses"])
    eval_dir = save_dir / "eval"
    steps, checkpoint = checkpoint_step(args, "wmt17/evaluate.sh")
    gen = ["fairseq-generate", str(data), "--user-dir", str(USER_DIR), "--path", str(checkpoint),
           "--task", "translation", "--source-lang", SRC, "--target-lang", TGT, "--gen-subset", "test",
           "--beam", str(args.beam), "--lenpen", str(args.lenpen), "--remove-bpe", "sentencepiece",
           "--max-tokens", str(args.max_tokens), "--max-len-b", str(args.max_len_b),
           "--required-batch-size-multiple", "1"]
    if args.cpu:
        gen += ["--cpu", "--num-workers", "0"]
    else:
        gen += ["--fp16"]
    steps.append(Step("generate", gen, stdout=eval_dir / "generate.out", log=eval_dir / "generate.log"))
    steps.append(Step("bleu", python_tool(
        "bleu", "--generate-output", eval_dir / "generate.out", "--ref-tok", meta["ref_tok"], "--compound-split",
        "--ref-raw", meta["ref_raw"], "--detok-lang", TGT, "--hyp-out", eval_dir / f"test.hyp.{TGT}",
        "--primary", "tok_bleu", "--json", eval_dir / "bleu.json", "--name", save_dir.name), env=tool_env()))
    Runner(eval_dir / ".stamps", args.dry_run, "wmt17/evaluate.sh").run_all(steps)
    return 0


ACTIONS = {"prepare": prepare, "train": train, "evaluate": evaluate}


if __name__ == "__main__":
    sys.exit(cli(__doc__, ACTIONS))
