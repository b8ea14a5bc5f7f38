"""CUDA benchmarks (run through ``benchmarks/gpu.sh``): training tokens/s and peak GPU memory.

Every measured configuration runs in its own subprocess (``python -m benchmarks.gpu --child ...``)
through fairseq's own :class:`fairseq.trainer.Trainer`, i.e. exactly ``fairseq-train``'s update:
fp16 uses fairseq's ``FP16Optimizer`` (fp32 master weights, dynamic loss scale), bf16 the same
path with ``--bf16``, the optimizer is fairseq's Adam (apex ``FusedAdam`` when apex is installed).

* tokens/s, fp16 and bf16, ``deepnet_transformer --deepnorm`` vs stock ``transformer``, base width
  (512/2048/8), both with and without apex's fused LayerNorm/FusedAdam when apex is importable
  ("no-apex" patches fairseq's ``has_fused_layernorm`` and ``get_fused_adam_class`` off);
* peak GPU memory (``torch.cuda.max_memory_allocated``) and tokens/s at 100L-100L base, fp16,
  ``--checkpoint-activations``, DeepNorm and stock.

Results: ``benchmarks/results/gpu.json`` and ``benchmarks/results/gpu_summary.md``.
``--device cpu`` exists only to test this file's plumbing on a machine without CUDA (fp32).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

MODELS = {"stock": ("transformer", []), "deepnorm": ("deepnet_transformer", ["--deepnorm"])}


def apex_available() -> bool:
    """Whether apex's fused LayerNorm imports (fairseq's own test)."""
    import fairseq.modules.layer_norm as layer_norm

    return bool(layer_norm.has_fused_layernorm)


def disable_apex() -> None:
    """Make fairseq build ``torch.nn.LayerNorm`` and its plain Adam even if apex is installed."""
    import fairseq.modules.layer_norm as layer_norm
    import fairseq.optim.adam as adam

    layer_norm.has_fused_layernorm = False
    adam.get_fused_adam_class = lambda: None


def child(
    model: str,
    precision: str,
    apex: bool,
    layers: int,
    checkpoint: bool,
    sentences: int,
    length: int,
    vocab: int,
    warmup: int,
    steps: int,
    device: str,
) -> Dict[str, Any]:
    """One configuration: ``warmup`` + ``steps`` Trainer updates on a fixed batch; tokens/s, peak memory."""
    import torch
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    from deepnet_fairseq.build import build_from_args, parse_command_line

    if not apex:
        disable_apex()
    elif not apex_available():
        raise RuntimeError("apex requested but not importable")
    cuda = device == "cuda"
    arch, extra = MODELS[model]
    flags = [*extra, "--encoder-layers", str(layers), "--decoder-layers", str(layers), "--share-all-embeddings"]
    flags += {"fp16": ["--fp16"], "bf16": ["--bf16"], "fp32": []}[precision]
    if checkpoint:
        flags.append("--checkpoint-activations")
    with tempfile.TemporaryDirectory() as tmp, common.quiet_logging():
        data = common.write_dictionary(Path(tmp), vocab)
        args = parse_command_line(common.command_line(data, arch, flags))
        if cuda:
            args.cpu = False
        # fairseq's legacy option post-processing turns --bf16 into --tpu (XLA); on a GPU we want
        # what fairseq-hydra-train does with common.bf16=true: bf16 weights on the CUDA device.
        args.tpu = False
        net, task, args = build_from_args(args, seed=None)
        cfg = convert_namespace_to_omegaconf(args)
        criterion = task.build_criterion(cfg.criterion)
        trainer = Trainer(cfg, task, net, criterion)
        sample = common.fixed_batch(task, sentences, length, length)
        layer_norm_types = sorted({type(m).__name__ for m in net.modules() if "LayerNorm" in type(m).__name__})

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()

        for _ in range(warmup):
            trainer.train_step([sample])
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            out = trainer.train_step([sample])
        sync()
        elapsed = time.perf_counter() - start
        loss = float(out["loss"]) if out and "loss" in out else float("nan")
        result = {
            "model": model,
            "arch": arch,
            "precision": precision,
            "apex": apex,
            "layers_per_side": layers,
            "checkpoint_activations": checkpoint,
            "tokens_per_step": sentences * length * 2,
            "target_tokens_per_step": sentences * length,
            "steps": steps,
            "seconds_per_step": elapsed / steps,
            "target_tokens_per_s": sentences * length * steps / elapsed,
            "loss": loss,
            "optimizer": type(trainer.optimizer).__name__,
            "inner_optimizer": type(getattr(trainer.optimizer, "fp32_optimizer", trainer.optimizer)).__name__,
            "layer_norm_types": layer_norm_types,
            "params": sum(p.numel() for p in net.parameters()),
        }
        if cuda:
            result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["gpu"] = torch.cuda.get_device_name()
    return result


def in_subprocess(options: Dict[str, Any]) -> Dict[str, Any]:
    """Run :func:`child` in a fresh interpreter (clean CUDA context and peak-memory counters)."""
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--child", json.dumps(options)]
    proc = subprocess.run(cmd, cwd=common.REPO, env=common.child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        return {**options, "error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> None:
    """Run the GPU benchmark matrix and write ``gpu.json`` / ``gpu_summary.md``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--layers", type=int, default=18, help="layers per side for the tokens/s runs")
    parser.add_argument("--deep-layers", type=int, default=100, help="layers per side for the memory run")
    parser.add_argument("--sentences", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="alternating stock/DeepNorm repeats per setting")
    a = parser.parse_args(argv)
    if a.child:
        print(json.dumps(child(**json.loads(a.child))))
        return

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device; nothing to do")
        return
    precisions = ["fp16", "bf16"] if a.device == "cuda" else ["fp32"]
    if a.device == "cuda" and not torch.cuda.is_bf16_supported():
        precisions = ["fp16"]
    apex_options = [False, True] if apex_available() else [False]
    base = {
        "sentences": a.sentences, "length": a.length, "vocab": a.vocab, "warmup": a.warmup,
        "steps": a.steps, "device": a.device, "checkpoint": False,
    }
    runs: List[Dict[str, Any]] = []
    comparisons: List[Dict[str, Any]] = []
    for precision in precisions:
        for apex in apex_options:
            got: Dict[str, List[float]] = {"stock": [], "deepnorm": []}
            for rep in range(a.repeats):
                for model in (["stock", "deepnorm"] if rep % 2 == 0 else ["deepnorm", "stock"]):
                    common.log(f"gpu {model} {precision} apex={apex} {a.layers}L-{a.layers}L rep {rep}")
                    res = in_subprocess({**base, "model": model, "precision": precision, "apex": apex,
                                         "layers": a.layers})
                    runs.append(res)
                    if "error" in res:
                        common.log(f"  failed: {res['error'][-500:]}")
                        continue
                    got[model].append(res["target_tokens_per_s"])
            if got["stock"] and got["deepnorm"]:
                s, d = max(got["stock"]), max(got["deepnorm"])
                comparisons.append({"precision": precision, "apex": apex, "stock_tokens_per_s": s,
                                    "deepnorm_tokens_per_s": d, "time_ratio": s / d})
    deep_runs = []
    for model in ("stock", "deepnorm"):
        common.log(f"gpu {model} {precisions[0]} {a.deep_layers}L-{a.deep_layers}L --checkpoint-activations")
        res = in_subprocess({**base, "model": model, "precision": precisions[0], "apex": apex_options[-1],
                             "layers": a.deep_layers, "checkpoint": True, "warmup": 2, "steps": 5})
        deep_runs.append(res)
        runs.append(res)
    env = common.environment()
    if a.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    result = {"environment": env, "apex_installed": apex_available(), "comparisons": comparisons,
              "deep_checkpointed": deep_runs, "runs": runs}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# GPU benchmark ({env.get('gpu', a.device)}, torch {env['torch']})", "",
        f"Trainer updates on a fixed batch of {a.sentences}x{a.length} target tokens, {a.layers}L-{a.layers}L "
        f"base (512/2048/8), vocab {a.vocab} shared; best of {a.repeats} runs, {a.steps} timed steps each.", "",
        "| precision | apex | stock tok/s | DeepNorm tok/s | time ratio DeepNorm/stock |", "|---|---|---:|---:|---:|",
    ]
    for c in comparisons:
        lines.append(f"| {c['precision']} | {'yes' if c['apex'] else 'no'} | {c['stock_tokens_per_s']:.0f} | "
                     f"{c['deepnorm_tokens_per_s']:.0f} | {c['time_ratio']:.3f} |")
    lines += ["", f"{a.deep_layers}L-{a.deep_layers}L base, {precisions[0]}, --checkpoint-activations:", "",
              "| model | params | s/step | peak GPU memory (GiB) |", "|---|---:|---:|---:|"]
    for r in deep_runs:
        if "error" in r:
            lines.append(f"| {r['model']} | failed | | |")
        else:
            lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['seconds_per_step']:.3f} | "
                         f"{r.get('peak_gpu_memory_gib', float('nan')):.2f} |")
    (a.out / "gpu_summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
