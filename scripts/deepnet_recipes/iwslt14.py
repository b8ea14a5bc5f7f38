"""IWSLT-14 German-English (the paper's Fig. 6 depth sweep): prepare, train, evaluate, sweep.

    scripts/iwslt14/prepare.sh [--out-dir DIR] [--data-dir ARCHIVES] ...
    scripts/iwslt14/train.sh SCHEME ENC_LAYERS DEC_LAYERS [GPUS [UPDATE_FREQ|auto]] [overrides] [-- fairseq flags]
    scripts/iwslt14/evaluate.sh RUN_DIR
    scripts/iwslt14/sweep.sh [--schemes a,b,...] [--depths 10,20,...,100] [GPUS] [overrides] [-- fairseq flags]

Data step for step as fairseq's prepare-iwslt14.sh (deviations: docs/recipes.md): training = train.tags.de-en
without the <url>/<talkid>/<keywords> lines, Moses-tokenized (no punctuation normalization, escaping on) and
lowercased, pairs cleaned to 1-175 tokens with length ratio <= 1.5, every 23rd pair held out as valid; test =
dev2010 + TEDX.dev2012 + tst2010 + tst2011 + tst2012 (the XML files); a joint SentencePiece BPE of 10k
(fairseq: subword-nmt BPE, 10k merges).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from deepnet_recipes.common import (
    EXIT_DIVERGED,
    REPO,
    SCRIPTS,
    Runner,
    Step,
    cli,
    fetch_step,
    python_tool,
    start_prepare,
    tool_env,
)
from deepnet_recipes.paper import TABLE1_SCHEMES as SCHEMES
from deepnet_recipes.paper import TABLE4_IWSLT14
from deepnet_recipes.training import BilingualRecipe, split_extra

HERE = SCRIPTS / "iwslt14"
CHECKSUMS = HERE / "checksums.sha256"
SRC, TGT = "de", "en"
ARCHIVE = "de-en.tgz"
URL = "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"  # fairseq's mirror of the WIT3 release
TEST_SETS = ["IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010", "IWSLT14.TED.tst2011",
             "IWSLT14.TED.tst2012"]
DEPTHS = list(range(10, 101, 10))
TARGET_TOKENS = TABLE4_IWSLT14.batch_tokens  # 4000 tokens per update [Table 4]
MAX_TOKENS = TARGET_TOKENS  # one GPU, no accumulation
DEFAULT_OUT = REPO / "runs" / "recipes" / "iwslt14_de_en"


def default_data() -> Path:
    return DEFAULT_OUT / "bin"


def prepare_steps(args: argparse.Namespace) -> List[Step]:
    out: Path = args.out_dir.resolve()
    raw, orig, text, bin_dir = out / "raw", out / "orig", out / "text", out / "bin"
    src_dir = orig / "de-en"
    env = tool_env()
    steps = [fetch_step(ARCHIVE, URL, raw, args, CHECKSUMS),
             Step("mkdir", ["mkdir", "-p", str(orig), str(text), str(bin_dir)], always=True),
             Step("extract", ["tar", "-xzf", str(raw / ARCHIVE), "-C", str(orig)])]
    for lang in (SRC, TGT):
        steps.append(Step(f"train-tags-{lang}", python_tool("iwslt-tags", src_dir / f"train.tags.de-en.{lang}",
                                                            text / f"train.raw.{lang}"), env=env))
        for name in TEST_SETS:
            steps.append(Step(f"xml-{name}-{lang}", python_tool(
                "sgm", src_dir / f"{name}.de-en.{lang}.xml", text / f"{name}.{lang}", "--ascii-apostrophe"), env=env))
        steps.append(Step(f"test-{lang}", python_tool("concat", text / f"test.raw.{lang}",
                                                      *[text / f"{n}.{lang}" for n in TEST_SETS]), env=env))
        for split in ("train", "test"):
            steps.append(Step(f"tokenize-{split}-{lang}", python_tool(
                "tokenize", text / f"{split}.raw.{lang}", text / f"{split}.tok.{lang}", "--lang", lang,
                "--lowercase", "--workers", args.workers), env=env))
    steps.append(Step("clean-train", python_tool(
        "clean", "--src", text / f"train.tok.{SRC}", "--tgt", text / f"train.tok.{TGT}",
        "--src-out", text / f"train.clean.{SRC}", "--tgt-out", text / f"train.clean.{TGT}",
        "--ratio", 1.5, "--min", 1, "--max", 175), env=env))
    steps.append(Step("split-valid", python_tool(
        "split-every", "--src", text / f"train.clean.{SRC}", "--tgt", text / f"train.clean.{TGT}",
        "--src-lang", SRC, "--tgt-lang", TGT, "--every", 23, "--every-out", text / "valid.tok",
        "--rest-out", text / "train.final"), env=env))
    steps.append(Step("spm-train", python_tool(
        "spm-train", "--inputs", text / f"train.final.{SRC}", text / f"train.final.{TGT}",
        "--model-prefix", out / "spm" / "spm", "--vocab-size", args.vocab_size, "--model-type", "bpe",
        "--threads", args.workers), env=env))
    pairs = [f"{text / f'{name}.{lang}'}:{text / f'{split}.spm.{lang}'}"
             for split, name in (("train", "train.final"), ("valid", "valid.tok"), ("test", "test.tok"))
             for lang in (SRC, TGT)]
    steps.append(Step("spm-encode", python_tool("spm-encode", "--model", out / "spm" / "spm.model", *pairs), env=env))
    steps.append(Step("binarize", [
        "fairseq-preprocess", "--source-lang", SRC, "--target-lang", TGT, "--joined-dictionary",
        "--trainpref", str(text / "train.spm"), "--validpref", str(text / "valid.spm"),
        "--testpref", str(text / "test.spm"), "--destdir", str(bin_dir), "--workers", str(args.workers)],
        log=out / "preprocess.log"))
    return steps


def prepare_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab-size", type=int, default=10000, help="joint SentencePiece BPE size (default 10000)")


def prepare(argv: Optional[Sequence[str]] = None) -> int:
    args, out = start_prepare(argv, __doc__, DEFAULT_OUT, CHECKSUMS, ["sacremoses", "sentencepiece"], prepare_options)
    Runner(out / ".stamps", args.dry_run, "iwslt14/prepare.sh").run_all(prepare_steps(args))
    if not args.dry_run:
        text = out / "text"
        meta = {"recipe": "iwslt14", "src": SRC, "tgt": TGT, "ref_tok": str(text / f"test.tok.{TGT}"),
                "ref_raw": str(text / f"test.raw.{TGT}"), "spm_model": str(out / "spm" / "spm.model")}
        (out / "bin" / "recipe.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"[iwslt14/prepare.sh] done: binarized data in {out / 'bin'}")
    return 0


def recipe_flags(scheme: str, encoder_layers: int, decoder_layers: int) -> List[str]:
    """fairseq-train flags: Table 4 of the paper (512 / 2048 / 8 heads, dropout 0.4, 4000 tokens per update)."""
    flags = [
        "--task", "translation", "--source-lang", SRC, "--target-lang", TGT,
        "--arch", "deepnet_transformer", "--residual-scheme", scheme,
        "--encoder-layers", str(encoder_layers), "--decoder-layers", str(decoder_layers),
        *TABLE4_IWSLT14.flags(),  # [Table 4]; 8,000 updates per depth [Table 4, Fig. 6]
        "--share-all-embeddings",  # joined dictionary [recipe choice]
        "--max-tokens", str(MAX_TOKENS), "--update-freq", "1",
        "--stop-on-divergence-patience", "20",
        "--no-epoch-checkpoints", "--seed", "1", "--log-format", "json", "--log-interval", "100",
        "--no-progress-bar",
    ]
    if scheme != "rezero":
        flags.append("--fp16")  # mixed precision for every model except ReZero [paper text, Fig. 6]
    return flags


RECIPE = BilingualRecipe(
    name="iwslt14", doc=__doc__, src=SRC, tgt=TGT, schemes=SCHEMES, max_tokens=MAX_TOKENS,
    target_tokens=TARGET_TOKENS, default_data=default_data(), flags=recipe_flags, gpus=1,
    update_freq_help=f"'auto' (default) keeps Table 4's {TARGET_TOKENS}-token batch",
    # evaluate [recipe choice, from fairseq's IWSLT example; the paper states none]: the last checkpoint, beam 5,
    # lenpen 1.0; primary = fairseq-generate's BLEU on the lowercased tokenized text
    average=0, beam=5, lenpen=1.0, eval_tools=["fairseq-generate"], bleu_detok_flags=["--lowercase"],
)
train = RECIPE.train
evaluate = RECIPE.evaluate


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def sweep(argv: Optional[Sequence[str]] = None) -> int:
    argv, extra = split_extra(argv)
    parser = argparse.ArgumentParser(prog="sweep.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gpus", type=int, nargs="?", default=1, help="GPUs per run (default 1)")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated (default: Table 1's ten)")
    parser.add_argument("--depths", type=_int_list, default=DEPTHS,
                        help="N for the NL-NL models (default 10,20,...,100)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "recipes" / "iwslt14_sweep",
                        help="one run directory per (scheme, depth) under here")
    for flag in ("--embed-dim", "--ffn-dim", "--heads", "--max-update", "--max-tokens", "--log-interval"):
        parser.add_argument(flag, type=int, help="passed to train.sh")
    parser.add_argument("--update-freq", default="auto", help="passed to train.sh (default auto)")
    parser.add_argument("--data", type=Path, help="passed to train.sh/evaluate.sh")
    parser.add_argument("--cpu", action="store_true", help="passed to train.sh/evaluate.sh")
    parser.add_argument("--max-len-b", type=int, help="passed to evaluate.sh")
    parser.add_argument("--dry-run", action="store_true", help="print every command and exit")
    args = parser.parse_args(argv)
    schemes = [s for s in args.schemes.split(",") if s]
    if not schemes:
        parser.error("--schemes is empty")
    if args.gpus < 1:
        parser.error("gpus must be a positive integer")
    out = args.out.resolve()
    base = [sys.executable, "-m", "deepnet_recipes.iwslt14"]
    passthrough: List[str] = []
    for name in ("embed_dim", "ffn_dim", "heads", "max_update", "max_tokens", "log_interval"):
        if getattr(args, name):
            passthrough += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.data:
        passthrough += ["--data", str(args.data.resolve())]
    if args.cpu:
        passthrough.append("--cpu")
    results = []
    env = dict(__import__("os").environ, **tool_env())
    for scheme in schemes:
        for depth in args.depths:
            run_dir = out / f"{scheme}-{depth}L-{depth}L"
            train_cmd = base + ["train", scheme, str(depth), str(depth), str(args.gpus), args.update_freq,
                                "--save-dir", str(run_dir), *passthrough]
            if extra:
                train_cmd += ["--", *extra]
            eval_cmd = base + ["evaluate", str(run_dir)]
            if args.data:
                eval_cmd += ["--data", str(args.data.resolve())]
            if args.cpu:
                eval_cmd.append("--cpu")
            if args.max_len_b:
                eval_cmd += ["--max-len-b", str(args.max_len_b)]
            if args.dry_run:
                print(Step("train", train_cmd, env=tool_env()).render())
                print(Step("evaluate", eval_cmd, env=tool_env()).render())
                continue
            print(f"[iwslt14/sweep.sh] {scheme} {depth}L-{depth}L -> {run_dir}", flush=True)
            code = subprocess.call(train_cmd, env=env)
            if code == 0:
                status = "finished"
                if subprocess.call(eval_cmd, env=env) != 0:
                    status = "evaluation failed"
            elif code == EXIT_DIVERGED:
                status = "diverged"
            else:
                status = f"failed (exit {code})"
            print(f"[iwslt14/sweep.sh] {scheme} {depth}L-{depth}L: {status}", flush=True)
            results.append((scheme, depth, status))
    if args.dry_run:
        return 0
    table = [sys.executable, str(SCRIPTS / "collect_results.py"), str(out), "--recipe", "iwslt14",
             "--markdown", str(out / "results.md"), "--csv", str(out / "results.csv"), "--plot", str(out / "fig6.png")]
    subprocess.call(table, env=env)
    failed = [r for r in results if r[2].startswith(("failed", "evaluation"))]
    return 1 if failed else 0


ACTIONS = {"prepare": prepare, "train": train, "evaluate": evaluate, "sweep": sweep}

if __name__ == "__main__":
    sys.exit(cli(__doc__, ACTIONS))
