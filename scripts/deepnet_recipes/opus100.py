"""OPUS-100 English-centric multilingual NMT (the paper's Table 2): prepare, train, evaluate.

    scripts/opus100/prepare.sh [--out-dir DIR] [--data-dir ARCHIVES] [--langs de,fr,...] ...
    scripts/opus100/train.sh {200l|1000l} [GPUS [UPDATE_FREQ|auto]] [overrides] [-- fairseq flags]
    scripts/opus100/evaluate.sh RUN_DIR [--directions de-en,en-de,...]

Data: the OPUS-100 v1.0 release (Zhang et al. 2020), ``opus-100-corpus/v1.0/supervised/<pair>/
opus.<pair>-{train,dev,test}.<lang>``, raw text; one joint SentencePiece model (64k) over all training
text; one shared dictionary; each pair binarized once as ``xx-en`` (fairseq's multilingual loader reads
it for both directions). Pairs without dev/test (5 in v1.0) are trained on but not validated/tested.
Training uses fairseq's ``translation_multi_simple_epoch`` with language tokens on every pair, train-only pairs
included (``--langtoks``), temperature sampling T=5 and a 64k SentencePiece unigram model (both recipe choices:
Zhang et al. 2020's released scripts use a 64k BPE, a ``<2xx>`` tag on the source and no temperature
sampling; the DeepNet paper states neither); evaluation is case-sensitive detokenized sacreBLEU per
direction and the X->En / En->X averages of Table 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from deepnet_recipes.common import (
    EXIT_MISSING_TOOL,
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
from deepnet_recipes.paper import (
    TABLE7_OPUS100,
    TABLE8_102LANG,
    TABLE8_LAYERS,
    Hparams,
    training_state_gb,
    transformer_params,
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
# model -> (layers per side, hyperparameters): Table 2's DeepNet rows [Table 7], and Table 3's 102-language model
# [Table 8] (its data, CCMatrix + CCAligned + OPUS + Tatoeba, is not built here: prepare it in this recipe's layout)
MODELS: Dict[str, Tuple[int, Hparams]] = {"200l": (100, TABLE7_OPUS100), "1000l": (500, TABLE7_OPUS100),
                                          "table8": (TABLE8_LAYERS, TABLE8_102LANG)}
MAX_TOKENS = 4096  # per GPU per step; update-freq makes up the rest of the table's global batch
SHARDING = {  # --sharding: how the training state is spread over the GPUs
    "fsdp": ["--ddp-backend", "fully_sharded"],  # needs fairscale
    "none": ["--ddp-backend", "c10d"],  # plain DDP: the whole training state on every GPU
}
FAIRSCALE_INSTALL = "pip install 'fairscale==0.4.13'"
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
    parser.add_argument("--vocab-size", type=int, default=64000,
                        help="joint SentencePiece unigram size (default 64000; the unigram model is a recipe choice)")
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
    """The multilingual task: language tokens [recipe choice, fairseq's M2M-100/mBART-50 style: ``__src__`` at
    the start of the source, ``__tgt__`` at the start of the target]. ``--langtoks`` names both data categories:
    fairseq fills only "main" from --encoder-langtok/--decoder-langtok, and a category it does not name (the
    train-only pairs) would train without any language token."""
    langtoks = {"main": ["src", "tgt"]}
    if meta.get("trainonly_pairs"):
        langtoks["trainonly"] = ["src", "tgt"]
    return ["--task", "translation_multi_simple_epoch", "--lang-dict", str(data / "langs.txt"),
            "--lang-pairs", ",".join(meta["lang_pairs"]),
            "--encoder-langtok", "src", "--decoder-langtok", "--langtoks", json.dumps(langtoks)]


def load_meta(data: Path, dry_run: bool) -> dict:
    path = data / "recipe.json"
    if path.exists():
        return json.loads(path.read_text())
    if dry_run:
        return {"lang_pairs": ["<xx-en,...,en-xx from prepare.sh>"], "trainonly_pairs": [], "test": {}}
    raise RecipeError(f"{path} is missing: run scripts/opus100/prepare.sh first (or pass --data)", EXIT_USAGE)


def recipe_flags(layers: int, hp: Hparams, data: Path, meta: dict, sharding: str) -> List[str]:
    """fairseq-train flags: ``hp`` (Table 7 for Table 2's models, Table 8 for the 102-language one)."""
    flags = task_flags(data, meta) + [
        "--sampling-method", "temperature", "--sampling-temperature", "5",  # [recipe choice: Zhang et al. 2020's
        # released scripts sample nothing; the DeepNet paper does not say]
        "--arch", "deepnet_transformer", "--residual-scheme", "deepnorm",
        "--encoder-layers", str(layers), "--decoder-layers", str(layers),
        *hp.flags(),  # [Table 7 / Table 8]
        "--share-all-embeddings",  # one SentencePiece vocabulary [recipe choice]
        "--max-tokens", str(MAX_TOKENS), "--update-freq", "1",
        "--fp16", "--checkpoint-activations", *SHARDING[sharding],  # [recipe choice: what fits 80 GB GPUs]
        "--stop-on-divergence-patience", "20",
        "--save-interval-updates", "2000", "--keep-interval-updates", "2", "--keep-last-epochs", "2",
        "--seed", "1", "--log-format", "json", "--log-interval", "100", "--no-progress-bar",
    ]
    if meta.get("trainonly_pairs"):
        # pairs with no dev set: training data only (fairseq's multilingual loader validates every --lang-pairs pair)
        flags += ["--extra-data", json.dumps({"trainonly": str(data)}),
                  "--extra-lang-pairs", json.dumps({"trainonly": ",".join(meta["trainonly_pairs"])})]
    return flags


def require_fairscale() -> None:
    """FSDP (``--ddp-backend fully_sharded``) imports fairscale; fail before anything runs when it is missing."""
    try:
        __import__("fairscale")
    except ImportError:
        raise RecipeError(
            "--sharding fsdp (fairseq's --ddp-backend fully_sharded) needs fairscale, which is not installed: "
            f"{FAIRSCALE_INSTALL} (GPU machines only: its FSDP does not run on CPU). Without it: --sharding none "
            "(plain DDP + activation checkpointing; see docs/recipes.md for what fits which GPU)", EXIT_MISSING_TOOL,
        ) from None


def memory_note(layers: int, hp: Hparams, vocab: int = 64000) -> str:
    """The fp16 + Adam training state of the model, per GPU without sharding."""
    params = transformer_params(layers, hp.embed_dim, hp.ffn_dim, vocab)
    return (f"# {params / 1e9:.2f}B parameters (vocabulary {vocab}): fp16 + Adam training state "
            f"{training_state_gb(params):.0f} GB ({training_state_gb(params, 12):.0f} GB with "
            f"--memory-efficient-fp16), on every GPU under --sharding none, 1/GPUS of it under fsdp")


def train(argv: Optional[Sequence[str]] = None) -> int:
    argv, extra = split_extra(argv)
    parser = recipe_parser("train.sh", __doc__)
    parser.add_argument("model", choices=sorted(MODELS),
                        help="200l = 100L-100L, 1000l = 500L-500L [Table 7]; "
                             "table8 = 100L-100L, 1024/4096/16 [Table 8]")
    parser.add_argument("gpus", type=int, nargs="?", default=8, help="GPUs (default 8 x 80 GB)")
    parser.add_argument("update_freq", nargs="?", default="auto",
                        help="'auto' (default) keeps the table's global batch (128 x 4096; Table 8: 256 x 4096)")
    parser.add_argument("--layers", type=int, help="override the layers per side (tests: 2)")
    parser.add_argument("--sharding", choices=sorted(SHARDING), default="fsdp",
                        help="fsdp (default; needs fairscale) or none (plain DDP; see docs/recipes.md for memory)")
    add_train_overrides(parser)
    args = parser.parse_args(argv)
    paper_layers, hp = MODELS[args.model]
    layers = args.layers or paper_layers
    if layers < 1:
        parser.error("--layers must be a positive integer")
    if args.sharding == "fsdp" and not args.cpu and not args.dry_run:
        require_fairscale()
    max_tokens, update_freq = resolve_plan_numbers(parser, args, args.gpus, args.update_freq, MAX_TOKENS,
                                                   hp.batch_tokens)
    data = (args.data or default_data()).resolve()
    meta = load_meta(data, args.dry_run)
    plan = TrainPlan(
        recipe="opus100", data=data, save_dir=(args.save_dir or default_run_dir("opus100", args.model)).resolve(),
        scheme="deepnorm", encoder_layers=layers, decoder_layers=layers, gpus=args.gpus, max_tokens=max_tokens,
        update_freq=update_freq, target_tokens=hp.batch_tokens,
        flags=recipe_flags(layers, hp, data, meta, args.sharding), info={"model": args.model, "table": hp.table},
    )
    print(memory_note(layers, hp))
    if args.cpu:
        print("# --cpu: --fp16 and --ddp-backend need CUDA; dropped for this run")
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
