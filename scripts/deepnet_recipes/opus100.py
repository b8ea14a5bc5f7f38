"""OPUS-100 English-centric multilingual NMT (the paper's Table 2): prepare, train, evaluate.

    scripts/opus100/prepare.sh [--out-dir DIR] [--data-dir ARCHIVES] [--langs de,fr,...] ...
    scripts/opus100/train.sh {200l|1000l} [GPUS [UPDATE_FREQ|auto]] [overrides] [-- fairseq flags]
    scripts/opus100/evaluate.sh RUN_DIR [--directions de-en,en-de,...]

Data: the OPUS-100 v1.0 release (Zhang et al. 2020), ``opus-100-corpus/v1.0/supervised/<pair>/
opus.<pair>-{train,dev,test}.<lang>``, raw text; one joint SentencePiece model (64k) over all training
text; one shared dictionary; each pair binarized once as ``xx-en`` (fairseq's multilingual loader reads
it for both directions). Pairs without dev/test (5 in v1.0) are trained on but not validated/tested.
Training uses fairseq's ``translation_multi_simple_epoch`` with language tokens (``--encoder-langtok src
--decoder-langtok``), temperature sampling; evaluation is case-sensitive detokenized sacreBLEU per
direction and the X->En / En->X averages of Table 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from deepnet_recipes.common import (
    EXIT_USAGE,
    REPO,
    SCRIPTS,
    RecipeError,
    Runner,
    Step,
    cli,
    fetch_step,
    python_tool,
    recipe_parser,
    require_tools,
    start_prepare,
    tool_env,
)
from deepnet_recipes.training import (
    TrainPlan,
    add_train_overrides,
    checkpoint_step,
    default_run_dir,
    eval_data,
    eval_parser,
    generate_command,
    resolve_plan_numbers,
    run_training,
    split_extra,
)

HERE = SCRIPTS / "opus100"
CHECKSUMS = HERE / "checksums.sha256"
ARCHIVE = "opus-100-corpus-v1.0.tar.gz"
URL = "https://object.pouta.csc.fi/OPUS-100/v1.0/opus-100-corpus-v1.0.tar.gz"
SUPERVISED = Path("opus-100-corpus") / "v1.0" / "supervised"
MODELS = {"200l": 100, "1000l": 500}  # total layers -> layers per side; d=512, FFN 2048, 8 heads [paper text]
MAX_TOKENS = 4096
TARGET_TOKENS = 128 * 4096  # recipe choice (Table 7 not confirmed): the WMT-17 proxy's global batch
DEFAULT_OUT = REPO / "runs" / "recipes" / "opus100"


def default_data() -> Path:
    return DEFAULT_OUT / "bin"


def pair_langs(pair_dir: str) -> str:
    a, _, b = pair_dir.partition("-")
    if "en" not in (a, b) or not a or not b:
        raise RecipeError(f"unexpected OPUS-100 pair directory {pair_dir!r} (expected xx-en or en-xx)")
    return b if a == "en" else a


def discover(sup: Path, langs: Optional[List[str]], dry_run: bool) -> Dict[str, dict]:
    """{xx: {"dir": pair dir name, "splits": [...]}} for the supervised pairs."""
    found: Dict[str, dict] = {}
    if sup.is_dir():
        for pair_dir in sorted(p.name for p in sup.iterdir() if p.is_dir()):
            xx = pair_langs(pair_dir)
            splits = [s for s in ("train", "dev", "test")
                      if (sup / pair_dir / f"opus.{pair_dir}-{s}.{xx}").exists()
                      and (sup / pair_dir / f"opus.{pair_dir}-{s}.en").exists()]
            if "train" in splits:
                found[xx] = {"dir": pair_dir, "splits": splits}
    elif dry_run and langs:
        found = {xx: {"dir": "-".join(sorted([xx, "en"])), "splits": ["train", "dev", "test"]} for xx in langs}
    if langs:
        missing = [x for x in langs if x not in found]
        if missing and not dry_run:
            raise RecipeError(f"--langs {','.join(missing)}: no such supervised pair under {sup}", EXIT_USAGE)
        found = {x: v for x, v in found.items() if x in langs}
    return found


def prepare_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--langs", help="only these non-English languages (comma-separated; default all 99)")
    parser.add_argument("--vocab-size", type=int, default=64000, help="joint SentencePiece size (default 64000)")
    parser.add_argument("--spm-sentences", type=int, default=10_000_000)


def prepare(argv: Optional[Sequence[str]] = None) -> int:
    args, out = start_prepare(argv, __doc__, DEFAULT_OUT, CHECKSUMS, ["sentencepiece"], prepare_options)
    langs = [x for x in (args.langs or "").split(",") if x] or None
    raw, orig, text, bin_dir = out / "raw", out / "orig", out / "text", out / "bin"
    if not args.dry_run:
        require_tools(["fairseq-preprocess", "tar"], ["sentencepiece"])
        out.mkdir(parents=True, exist_ok=True)
    runner = Runner(out / ".stamps", args.dry_run, "opus100/prepare.sh")
    runner.run_all([fetch_step(ARCHIVE, URL, raw, args, CHECKSUMS),
                    Step("mkdir", ["mkdir", "-p", str(orig), str(text), str(bin_dir)], always=True),
                    Step("extract", ["tar", "-xzf", str(raw / ARCHIVE), "-C", str(orig)])])
    sup = orig / SUPERVISED
    pairs = discover(sup, langs, args.dry_run)
    if not pairs:
        if args.dry_run:
            print("# (the per-pair steps are listed once the archive is extracted, or give --langs)")
            return 0
        raise RecipeError(f"no supervised pairs found under {sup}")
    env = tool_env()
    steps: List[Step] = []
    train_files = []
    for xx, info in pairs.items():
        for lang in (xx, "en"):
            train_files.append(sup / info["dir"] / f"opus.{info['dir']}-train.{lang}")
    steps.append(Step("spm-train", python_tool(
        "spm-train", "--inputs", *train_files, "--model-prefix", out / "spm" / "spm", "--vocab-size", args.vocab_size,
        "--model-type", "unigram", "--character-coverage", 0.9995, "--input-sentence-size", args.spm_sentences,
        "--threads", args.workers), env=env))
    steps.append(Step("dict", python_tool("spm-dict", out / "spm" / "spm.vocab", bin_dir / "dict.txt"), env=env))
    for xx, info in pairs.items():
        d = info["dir"]
        enc = [f"{sup / d / f'opus.{d}-{s}.{lang}'}:{text / f'{xx}-en' / f'{s}.{lang}'}"
               for s in info["splits"] for lang in (xx, "en")]
        steps.append(Step(f"spm-encode-{xx}", python_tool("spm-encode", "--model", out / "spm" / "spm.model", *enc),
                          env=env))
        steps.append(Step(f"clean-{xx}", python_tool(
            "clean", "--src", text / f"{xx}-en" / f"train.{xx}", "--tgt", text / f"{xx}-en" / "train.en",
            "--src-out", text / f"{xx}-en" / f"train.clean.{xx}", "--tgt-out", text / f"{xx}-en" / "train.clean.en",
            "--ratio", 0, "--min", 1, "--max", 250), env=env))
        cmd = ["fairseq-preprocess", "--source-lang", xx, "--target-lang", "en", "--srcdict", str(bin_dir / "dict.txt"),
               "--tgtdict", str(bin_dir / "dict.txt"), "--trainpref", str(text / f"{xx}-en" / "train.clean")]
        if "dev" in info["splits"]:
            cmd += ["--validpref", str(text / f"{xx}-en" / "dev")]
        if "test" in info["splits"]:
            cmd += ["--testpref", str(text / f"{xx}-en" / "test")]
        cmd += ["--destdir", str(bin_dir), "--workers", str(args.workers)]
        steps.append(Step(f"binarize-{xx}", cmd, log=out / "logs" / f"preprocess.{xx}-en.log"))
    runner.run_all(steps)
    if not args.dry_run:
        main = sorted(x for x, i in pairs.items() if "dev" in i["splits"])
        meta = {
            "recipe": "opus100", "langs": sorted(pairs),
            "lang_pairs": [f"{x}-en" for x in main] + [f"en-{x}" for x in main],
            "trainonly_pairs": [f"{x}-en" for x in sorted(pairs) if x not in main]
                               + [f"en-{x}" for x in sorted(pairs) if x not in main],
            "test": {x: {"en": str(sup / i["dir"] / f"opus.{i['dir']}-test.en"),
                         x: str(sup / i["dir"] / f"opus.{i['dir']}-test.{x}")}
                     for x, i in pairs.items() if "test" in i["splits"]},
            "spm_model": str(out / "spm" / "spm.model"),
        }
        (bin_dir / "langs.txt").write_text("".join(f"{x}\n" for x in sorted(set(pairs) | {"en"})))
        (bin_dir / "recipe.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"[opus100/prepare.sh] done: {len(pairs)} pairs binarized in {bin_dir}")
    return 0


def task_flags(data: Path, meta: dict) -> List[str]:
    flags = ["--task", "translation_multi_simple_epoch", "--lang-dict", str(data / "langs.txt"),
             "--lang-pairs", ",".join(meta["lang_pairs"]),
             "--encoder-langtok", "src", "--decoder-langtok"]  # language tokens [proxy: fairseq M2M/mBART-50 style]
    return flags


def load_meta(data: Path, dry_run: bool) -> dict:
    path = data / "recipe.json"
    if path.exists():
        return json.loads(path.read_text())
    if dry_run:
        return {"lang_pairs": ["<xx-en,...,en-xx from prepare.sh>"], "trainonly_pairs": [], "test": {}}
    raise RecipeError(f"{path} is missing: run scripts/opus100/prepare.sh first (or pass --data)", EXIT_USAGE)


def recipe_flags(layers: int, data: Path, meta: dict) -> List[str]:
    flags = task_flags(data, meta) + [
        "--sampling-method", "temperature", "--sampling-temperature", "5",  # [proxy: Zhang et al. 2020, T=5]
        "--arch", "deepnet_transformer",  # d=512, FFN 2048, 8 heads [paper text]
        "--residual-scheme", "deepnorm", "--encoder-layers", str(layers), "--decoder-layers", str(layers),
        "--share-all-embeddings",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "0.0",
        "--lr", "5e-4", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4000", "--warmup-init-lr", "1e-7",
        "--dropout", "0.1", "--weight-decay", "0.0",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--max-tokens", str(MAX_TOKENS), "--update-freq", "1",
        "--max-epoch", "4",  # 4 epochs [paper text]
        "--fp16", "--checkpoint-activations", "--ddp-backend", "fully_sharded",
        "--stop-on-divergence-patience", "20",
        "--save-interval-updates", "2000", "--keep-interval-updates", "2", "--keep-last-epochs", "2",
        "--seed", "1", "--log-format", "json", "--log-interval", "100", "--no-progress-bar",
    ]
    if meta.get("trainonly_pairs"):
        # pairs with no dev set: training data only (fairseq's multilingual loader validates every --lang-pairs pair)
        flags += ["--extra-data", json.dumps({"trainonly": str(data)}),
                  "--extra-lang-pairs", json.dumps({"trainonly": ",".join(meta["trainonly_pairs"])})]
    return flags


def train(argv: Optional[Sequence[str]] = None) -> int:
    argv, extra = split_extra(argv)
    parser = recipe_parser("train.sh", __doc__)
    parser.add_argument("model", choices=sorted(MODELS), help="200l = 100L-100L, 1000l = 500L-500L")
    parser.add_argument("gpus", type=int, nargs="?", default=8, help="GPUs (default 8 x 80 GB)")
    parser.add_argument("update_freq", nargs="?", default="auto",
                        help="'auto' (default) keeps the 128 x 4096-token global batch")
    parser.add_argument("--layers", type=int, help="override the layers per side (tests: 2)")
    add_train_overrides(parser)
    args = parser.parse_args(argv)
    layers = args.layers or MODELS[args.model]
    if layers < 1:
        parser.error("--layers must be a positive integer")
    max_tokens, update_freq = resolve_plan_numbers(parser, args, args.gpus, args.update_freq, MAX_TOKENS,
                                                   TARGET_TOKENS)
    data = (args.data or default_data()).resolve()
    meta = load_meta(data, args.dry_run)
    plan = TrainPlan(
        recipe="opus100", data=data, save_dir=(args.save_dir or default_run_dir("opus100", args.model)).resolve(),
        scheme="deepnorm", encoder_layers=layers, decoder_layers=layers, gpus=args.gpus, max_tokens=max_tokens,
        update_freq=update_freq, target_tokens=TARGET_TOKENS, flags=recipe_flags(layers, data, meta),
        info={"model": args.model},
    )
    if args.cpu:
        print("# --cpu: FSDP (--ddp-backend fully_sharded) and --fp16 need CUDA; dropped for this run")
    return run_training(plan, args, extra, "opus100/train.sh")


def evaluate(argv: Optional[Sequence[str]] = None) -> int:
    parser = eval_parser(__doc__, average=0, beam=5, lenpen=1.0)
    parser.add_argument("--directions", help="only these (comma-separated, e.g. de-en,en-de)")
    args = parser.parse_args(argv)
    data = eval_data(parser, args, default_data())
    save_dir: Path = args.save_dir
    meta = load_meta(data, args.dry_run)
    if not args.dry_run:
        require_tools(["fairseq-generate"], ["sacrebleu"])
    directions = [(x, "en") for x in sorted(meta["test"])] + [("en", x) for x in sorted(meta["test"])]
    if args.directions:
        wanted = set(args.directions.split(","))
        unknown = wanted - {f"{s}-{t}" for s, t in directions}
        if unknown:
            parser.error(f"--directions {','.join(sorted(unknown))}: no test set for it in {data}")
        directions = [(s, t) for s, t in directions if f"{s}-{t}" in wanted]
    eval_dir = save_dir / "eval"
    steps, checkpoint = checkpoint_step(args, "opus100/evaluate.sh")
    for src, tgt in directions:
        name = f"{src}-{tgt}"
        xx = src if tgt == "en" else tgt
        gen = generate_command(data, checkpoint, task_flags(data, meta), src, tgt, args)
        steps.append(Step(f"generate-{name}", gen, stdout=eval_dir / f"generate.{name}.out",
                          log=eval_dir / f"generate.{name}.log"))
        steps.append(Step(f"bleu-{name}", python_tool(
            "bleu", "--generate-output", eval_dir / f"generate.{name}.out", "--ref-raw", meta["test"][xx][tgt],
            "--hyp-out", eval_dir / f"test.{name}.{tgt}", "--primary", "sacrebleu",
            "--json", eval_dir / f"bleu.{name}.json", "--name", name), env=tool_env()))
    Runner(eval_dir / ".stamps", args.dry_run, "opus100/evaluate.sh").run_all(steps)
    if args.dry_run:
        print(f"# then: averages of {eval_dir}/bleu.*.json -> {eval_dir}/bleu.json")
        return 0
    scores = {f"{s}-{t}": json.loads((eval_dir / f"bleu.{s}-{t}.json").read_text()) for s, t in directions}
    x_en = [v["sacrebleu"] for k, v in scores.items() if k.endswith("-en")]
    en_x = [v["sacrebleu"] for k, v in scores.items() if k.startswith("en-")]

    def mean(values):
        return round(sum(values) / len(values), 2) if values else None

    summary = {"x_en": mean(x_en), "en_x": mean(en_x), "bleu": mean(x_en + en_x),
               "directions": {k: v["sacrebleu"] for k, v in scores.items()},
               "signature": next(iter(scores.values()))["signature"] if scores else None,
               "primary": "sacrebleu (average over directions)"}
    (eval_dir / "bleu.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[opus100/evaluate.sh] X->En {summary['x_en']}  En->X {summary['en_x']}  Avg {summary['bleu']} "
          f"over {len(scores)} directions (paper Table 2, 200L: 33.2 / 29.0 / 31.1; 1000L: 33.9 / 30.2 / 32.1)")
    return 0


ACTIONS = {"prepare": prepare, "train": train, "evaluate": evaluate}

if __name__ == "__main__":
    sys.exit(cli(__doc__, ACTIONS))
