"""Shared train/evaluate driver of the recipes: fairseq-train/-generate command lines, the global-batch
arithmetic, small-model/CPU overrides that leave the recipe's other flags intact, run records.

A training run directory (``--save-dir``) holds::

    run.json     recipe, scheme, depths, GPUs, update-freq, global batch, the full command
    train.log    fairseq's log (json format; appended across resumes)
    exit_code    of the last fairseq-train call; 3 = the plugin's --stop-on-divergence-patience exit
    status       finished | diverged | failed
    checkpoint*.pt
    eval/        evaluate.sh outputs (generate.out, bleu.json, ...)
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from deepnet_recipes.common import (
    EXIT_DIVERGED,
    EXIT_USAGE,
    REPO,
    USER_DIR,
    RecipeError,
    Runner,
    Step,
    check_positive,
    python_tool,
    recipe_parser,
    require_tools,
    tool_env,
)

GPU_ONLY_FLAGS = {"--fp16", "--memory-efficient-fp16", "--allow-rezero-fp16", "--checkpoint-activations-offload"}
GPU_ONLY_VALUED = {"--ddp-backend", "--fp16-init-scale", "--distributed-world-size"}


@dataclass
class TrainPlan:
    recipe: str
    data: Path
    save_dir: Path
    scheme: str
    encoder_layers: int
    decoder_layers: int
    gpus: int
    max_tokens: int
    update_freq: int
    target_tokens: int  # the paper's (or proxy's) global batch, in tokens
    flags: List[str]  # the recipe's hyperparameters (fairseq flags), GPU flags included
    info: Dict[str, object] = field(default_factory=dict)


def split_extra(argv: Optional[Sequence[str]]) -> tuple:
    """argv before ``--`` and the fairseq flags after it."""
    argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1:]
    return argv, []


def add_train_overrides(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("overrides for small test runs (the recipe's other flags stay as they are)")
    group.add_argument("--cpu", action="store_true",
                       help="train on CPU: drops --fp16/--allow-rezero-fp16/--ddp-backend/--distributed-world-size, "
                            "adds --cpu --num-workers 0 --required-batch-size-multiple 1")
    group.add_argument("--embed-dim", type=int, help="encoder/decoder embedding dim (recipe: from --arch)")
    group.add_argument("--ffn-dim", type=int, help="encoder/decoder FFN dim")
    group.add_argument("--heads", type=int, help="encoder/decoder attention heads")
    group.add_argument("--max-update", type=int, help="stop after this many updates")
    group.add_argument("--max-tokens", type=int, help="tokens per GPU per step (the update-freq is recomputed "
                                                         "to keep the global batch unless given)")
    group.add_argument("--log-interval", type=int, help="fairseq --log-interval")
    group.add_argument("--save-dir", type=Path, help="run directory (default runs/recipes/RECIPE/NAME)")
    group.add_argument("--data", type=Path, help="binarized data (default: the prepare script's output)")
    group.add_argument("--force", action="store_true", help="train even if the run is recorded finished/diverged")
    parser.add_argument("--dry-run", action="store_true", help="print the exact command and exit")
    parser.epilog = ((parser.epilog or "") + "\nExtra fairseq-train flags go after '--' (they come last, so they "
                     "override the recipe's).")


def auto_update_freq(target_tokens: int, gpus: int, max_tokens: int) -> int:
    return max(1, math.ceil(target_tokens / (gpus * max_tokens)))


def parse_update_freq(text: str, parser: argparse.ArgumentParser) -> Optional[int]:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        parser.error(f"update-freq must be a positive integer or 'auto', got {text!r}")
    if value < 1:
        parser.error(f"update-freq must be a positive integer or 'auto', got {text!r}")
    return value


def strip_gpu_flags(flags: List[str]) -> List[str]:
    out: List[str] = []
    skip = False
    for flag in flags:
        if skip:
            skip = False
            continue
        if flag in GPU_ONLY_FLAGS:
            continue
        if flag in GPU_ONLY_VALUED:
            skip = True
            continue
        out.append(flag)
    return out


def override_flag(flags: List[str], name: str, value: object) -> List[str]:
    """Replace the value of ``name`` in the flag list (or append it)."""
    out = list(flags)
    if name in out:
        out[out.index(name) + 1] = str(value)
    else:
        out += [name, str(value)]
    return out


def train_command(plan: TrainPlan, args: argparse.Namespace, extra: Sequence[str]) -> List[str]:
    flags = list(plan.flags)
    flags = override_flag(flags, "--max-tokens", plan.max_tokens)
    flags = override_flag(flags, "--update-freq", plan.update_freq)
    if args.max_update:
        flags = override_flag(flags, "--max-update", args.max_update)
    if args.log_interval:
        flags = override_flag(flags, "--log-interval", args.log_interval)
    for side in ("encoder", "decoder"):
        for value, flag in ((args.embed_dim, f"--{side}-embed-dim"), (args.ffn_dim, f"--{side}-ffn-embed-dim"),
                            (args.heads, f"--{side}-attention-heads")):
            if value:
                flags = override_flag(flags, flag, value)
    if plan.gpus > 1 and not args.cpu:
        flags += ["--distributed-world-size", str(plan.gpus)]
    if args.cpu:
        flags = strip_gpu_flags(flags) + ["--cpu", "--num-workers", "0", "--required-batch-size-multiple", "1"]
    return ["fairseq-train", str(plan.data), "--user-dir", str(USER_DIR), *flags,
            "--save-dir", str(plan.save_dir), *extra]


def batch_text(tokens: int) -> str:
    """``524288 = 128 x 4096`` (the paper's notation) or ``4000``."""
    return f"{tokens} = {tokens // 4096} x 4096" if tokens % 4096 == 0 else str(tokens)


def read_status(save_dir: Path) -> Optional[str]:
    path = save_dir / "status"
    return path.read_text().strip() if path.exists() else None


def run_training(plan: TrainPlan, args: argparse.Namespace, extra: Sequence[str], prog: str) -> int:
    cmd = train_command(plan, args, extra)
    global_tokens = plan.gpus * plan.max_tokens * plan.update_freq
    note = (f"# {plan.recipe}: {plan.scheme} {plan.encoder_layers}L-{plan.decoder_layers}L on "
            f"{plan.gpus} {'process' if args.cpu else 'GPU'}(s): {plan.gpus} x {plan.max_tokens} tokens x "
            f"update-freq {plan.update_freq} = {global_tokens} tokens per update "
            f"(recipe target {batch_text(plan.target_tokens)})")
    print(note, flush=True)
    if global_tokens < plan.target_tokens or global_tokens > 1.1 * plan.target_tokens:
        print(f"# warning: the global batch differs from the recipe's {plan.target_tokens} tokens", flush=True)
    step = Step("train", cmd, log=plan.save_dir / "train.log", append=True, always=True,
                ok_codes=(0, EXIT_DIVERGED))
    runner = Runner(plan.save_dir, args.dry_run, prog)
    if args.dry_run:
        runner.run(step)
        return 0
    require_tools(["fairseq-train"])
    if not (plan.data / "dict.txt").exists() and not any(plan.data.glob("dict.*.txt")):
        raise RecipeError(f"no binarized data in {plan.data} (run the recipe's prepare.sh first, or pass --data)",
                          EXIT_USAGE)
    status = read_status(plan.save_dir)
    if status in ("finished", "diverged") and not args.force:
        print(f"[{prog}] {plan.save_dir}: already {status} (see {plan.save_dir / 'train.log'}); --force retrains")
        return EXIT_DIVERGED if status == "diverged" else 0
    plan.save_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "recipe": plan.recipe, "scheme": plan.scheme, "encoder_layers": plan.encoder_layers,
        "decoder_layers": plan.decoder_layers, "gpus": plan.gpus, "max_tokens": plan.max_tokens,
        "update_freq": plan.update_freq, "global_batch_tokens": global_tokens, "target_tokens": plan.target_tokens,
        "data": str(plan.data), "cpu": bool(args.cpu), "command": " ".join(shlex.quote(c) for c in cmd),
        **plan.info,
    }
    (plan.save_dir / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    (plan.save_dir / "status").write_text("running\n")
    try:
        code = runner.run(step)
    except RecipeError as err:
        (plan.save_dir / "exit_code").write_text(f"{err.code}\n")
        (plan.save_dir / "status").write_text("failed\n")
        raise
    (plan.save_dir / "exit_code").write_text(f"{code}\n")
    status = "diverged" if code == EXIT_DIVERGED else "finished"
    (plan.save_dir / "status").write_text(status + "\n")
    print(f"[{prog}] {plan.save_dir}: {status} (exit code {code})")
    return code


def resolve_plan_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace, gpus: int,
                         update_freq_text: str, default_max_tokens: int, target_tokens: int) -> tuple:
    check_positive(parser, gpus=gpus, max_tokens=args.max_tokens, max_update=args.max_update,
                   embed_dim=args.embed_dim, ffn_dim=args.ffn_dim, heads=args.heads)
    max_tokens = args.max_tokens or default_max_tokens
    update_freq = parse_update_freq(update_freq_text, parser)
    if update_freq is None:
        update_freq = auto_update_freq(target_tokens, gpus, max_tokens)
    return max_tokens, update_freq


def default_run_dir(recipe: str, name: str) -> Path:
    return REPO / "runs" / "recipes" / recipe / name


# ---- evaluation -----------------------------------------------------------------------------------
def add_eval_args(parser: argparse.ArgumentParser, average: int) -> None:
    parser.add_argument("save_dir", type=Path, help="the training run directory (train.sh's --save-dir)")
    parser.add_argument("--data", type=Path, help="binarized data (default: from SAVE_DIR/run.json)")
    parser.add_argument("--average", type=int, default=average, metavar="N",
                        help=f"average the last N epoch checkpoints (default {average}; 0: use --checkpoint)")
    parser.add_argument("--checkpoint", default="checkpoint_last.pt",
                        help="checkpoint to evaluate when not averaging (or when no epoch checkpoint exists)")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=8000, help="fairseq-generate --max-tokens")
    parser.add_argument("--max-len-b", type=int, default=200,
                        help="fairseq-generate --max-len-b (default 200, fairseq's; small for quick tests)")
    parser.add_argument("--dry-run", action="store_true", help="print the exact commands and exit")


def eval_parser(doc: Optional[str], average: int, beam: int, lenpen: float) -> argparse.ArgumentParser:
    """evaluate.sh's parser: :func:`add_eval_args` and the recipe's default ``--beam``/``--lenpen``."""
    parser = recipe_parser("evaluate.sh", doc)
    add_eval_args(parser, average=average)
    parser.add_argument("--beam", type=int, default=beam)
    parser.add_argument("--lenpen", type=float, default=lenpen)
    return parser


def eval_data(parser: argparse.ArgumentParser, args: argparse.Namespace, default_data: Path) -> Path:
    """Resolve ``args.save_dir`` in place (a usage error unless it exists or ``--dry-run``) and return the
    binarized data directory: ``--data``, else the run's ``run.json``, else ``default_data``."""
    save_dir = args.save_dir.resolve()
    args.save_dir = save_dir
    if not args.dry_run and not save_dir.is_dir():
        parser.error(f"{save_dir}: no such run directory")
    return (args.data or Path(run_info(save_dir).get("data", default_data))).resolve()


def generate_command(data: Path, checkpoint: Path, task_flags: Sequence[str], src: str, tgt: str,
                     args: argparse.Namespace) -> List[str]:
    """fairseq-generate on the test split with evaluate.sh's options (``--cpu``, beam, lengths)."""
    gen = ["fairseq-generate", str(data), "--user-dir", str(USER_DIR), "--path", str(checkpoint),
           *task_flags, "--source-lang", src, "--target-lang", tgt, "--gen-subset", "test",
           "--beam", str(args.beam), "--lenpen", str(args.lenpen), "--remove-bpe", "sentencepiece",
           "--max-tokens", str(args.max_tokens), "--max-len-b", str(args.max_len_b),
           "--required-batch-size-multiple", "1"]
    return gen + (["--cpu", "--num-workers", "0"] if args.cpu else ["--fp16"])


def run_info(save_dir: Path) -> dict:
    path = save_dir / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def data_meta(data: Path) -> dict:
    path = data / "recipe.json"
    if not path.exists():
        raise RecipeError(f"{path} is missing: evaluate needs data prepared by the recipe's prepare.sh", EXIT_USAGE)
    return json.loads(path.read_text())


def checkpoint_step(args: argparse.Namespace, prog: str) -> tuple:
    """(steps, checkpoint path): average the last N epoch checkpoints, or fall back to --checkpoint."""
    save_dir: Path = args.save_dir
    epochs = sorted((int(p.stem[len("checkpoint"):]), p) for p in save_dir.glob("checkpoint[0-9]*.pt")
                    if p.stem[len("checkpoint"):].isdigit())
    if args.average > 0 and (epochs or args.dry_run):
        count = min(args.average, len(epochs)) if epochs else args.average
        if epochs and count < args.average:
            print(f"[{prog}] warning: only {len(epochs)} epoch checkpoint(s) in {save_dir}; averaging {count}")
        output = save_dir / "eval" / f"averaged_last{count}.pt"
        stamp_key = " ".join(f"{p.name}:{p.stat().st_mtime_ns}" for _, p in epochs[-count:])
        step = Step("average", ["deepnet-average-checkpoints", "--inputs", str(save_dir),
                                "--num-epoch-checkpoints", str(count), "--output", str(output)],
                    log=save_dir / "eval" / "average.log", key_extra=stamp_key)
        return [step], output
    checkpoint = save_dir / args.checkpoint
    if args.average > 0:
        print(f"[{prog}] warning: no epoch checkpoints in {save_dir}; evaluating {checkpoint} without averaging")
    if not args.dry_run and not checkpoint.exists():
        raise RecipeError(f"{checkpoint} does not exist (has the run trained? see {save_dir / 'train.log'})",
                          EXIT_USAGE)
    key = f"{checkpoint.stat().st_mtime_ns}" if checkpoint.exists() else ""
    check = Step("checkpoint", ["test", "-s", str(checkpoint)], key_extra=key)
    return [check], checkpoint


# ---- one-direction translation recipes (WMT-17, IWSLT-14) ----------------------------------------
@dataclass(frozen=True)
class BilingualRecipe:
    """What differs between the train.sh/evaluate.sh of the bilingual recipes; :meth:`train` and
    :meth:`evaluate` are those actions."""

    name: str  # "wmt17": run directories, run.json and the "wmt17/train.sh" message prefix
    doc: Optional[str]  # the recipe module's docstring (--help)
    src: str
    tgt: str
    schemes: Sequence[str]  # named in the SCHEME help
    max_tokens: int  # tokens per GPU per step
    target_tokens: int  # the global batch, in tokens
    default_data: Path  # prepare.sh's binarized output
    flags: Callable[[str, int, int], List[str]]  # (scheme, encoder layers, decoder layers) -> fairseq-train flags
    gpus: int  # default GPUS
    update_freq_help: str
    average: int  # default evaluate.sh --average
    beam: int
    lenpen: float
    eval_tools: Sequence[str]  # console scripts evaluate.sh needs
    bleu_ref_tok_flags: Sequence[str] = ()  # bleu flags right after --ref-tok FILE (--compound-split: an extra)
    bleu_detok_flags: Sequence[str] = ()  # bleu flags right after --detok-lang LANG (e.g. --lowercase)

    def train(self, argv: Optional[Sequence[str]] = None) -> int:
        argv, extra = split_extra(argv)
        parser = recipe_parser("train.sh", self.doc)
        parser.add_argument("scheme", help=f"residual scheme ({', '.join(self.schemes)}; any --residual-scheme name)")
        parser.add_argument("encoder_layers", type=int)
        parser.add_argument("decoder_layers", type=int)
        parser.add_argument("gpus", type=int, nargs="?", default=self.gpus, help=f"GPUs (default {self.gpus})")
        parser.add_argument("update_freq", nargs="?", default="auto", help=self.update_freq_help)
        add_train_overrides(parser)
        args = parser.parse_args(argv)
        if args.encoder_layers < 1 or args.decoder_layers < 1:
            parser.error("encoder and decoder layers must be positive integers")
        max_tokens, update_freq = resolve_plan_numbers(parser, args, args.gpus, args.update_freq, self.max_tokens,
                                                       self.target_tokens)
        name = f"{args.scheme}-{args.encoder_layers}L-{args.decoder_layers}L"
        plan = TrainPlan(
            recipe=self.name, data=(args.data or self.default_data).resolve(),
            save_dir=(args.save_dir or default_run_dir(self.name, name)).resolve(), scheme=args.scheme,
            encoder_layers=args.encoder_layers, decoder_layers=args.decoder_layers, gpus=args.gpus,
            max_tokens=max_tokens, update_freq=update_freq, target_tokens=self.target_tokens,
            flags=self.flags(args.scheme, args.encoder_layers, args.decoder_layers),
        )
        return run_training(plan, args, extra, f"{self.name}/train.sh")

    def evaluate(self, argv: Optional[Sequence[str]] = None) -> int:
        parser = eval_parser(self.doc, self.average, self.beam, self.lenpen)
        args = parser.parse_args(argv)
        data = eval_data(parser, args, self.default_data)
        save_dir: Path = args.save_dir
        tgt = self.tgt
        if args.dry_run and not (data / "recipe.json").exists():
            text = data.parent / "text"
            meta = {"ref_tok": str(text / f"test.tok.{tgt}"), "ref_raw": str(text / f"test.raw.{tgt}")}
        else:
            meta = data_meta(data)
        if not args.dry_run:
            require_tools(self.eval_tools, ["sacrebleu", "sacremoses"])
        eval_dir = save_dir / "eval"
        prog = f"{self.name}/evaluate.sh"
        steps, checkpoint = checkpoint_step(args, prog)
        gen = generate_command(data, checkpoint, ["--task", "translation"], self.src, tgt, args)
        steps.append(Step("generate", gen, stdout=eval_dir / "generate.out", log=eval_dir / "generate.log"))
        steps.append(Step("bleu", python_tool(
            "bleu", "--generate-output", eval_dir / "generate.out", "--ref-tok", meta["ref_tok"],
            *self.bleu_ref_tok_flags, "--ref-raw", meta["ref_raw"], "--detok-lang", tgt, *self.bleu_detok_flags,
            "--hyp-out", eval_dir / f"test.hyp.{tgt}", "--primary", "fairseq_bleu", "--json", eval_dir / "bleu.json",
            "--name", save_dir.name), env=tool_env()))
        Runner(eval_dir / ".stamps", args.dry_run, prog).run_all(steps)
        return 0
