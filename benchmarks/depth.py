"""Depth scaling at tiny width (64/128, 2 heads): time per update and peak RSS vs layers.

Each depth point runs in its own subprocess (``python -m benchmarks.depth --layers N ...``) so that
the child's peak RSS is the peak of that configuration alone (``VmHWM``; ``ru_maxrss`` would inherit
the parent's peak on Linux, see :func:`benchmarks.common.peak_rss_mib`).  The child
builds ``deepnet_transformer_tiny --deepnorm`` with N encoder and N decoder layers, optionally with
fairseq's ``--checkpoint-activations``, runs warm-up and timed updates (fairseq criterion, fairseq
Adam) on one fixed batch and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

ARCH = "deepnet_transformer_tiny"


def run_point(
    layers: int, checkpoint: bool, updates: int, warmup: int, sentences: int, length: int, vocab: int
) -> Dict[str, Any]:
    """Measure one depth point in this process (call it in a fresh subprocess for a clean peak RSS)."""
    common.single_thread()
    import torch

    with tempfile.TemporaryDirectory() as tmp, common.quiet_logging():
        data = common.write_dictionary(Path(tmp), vocab)
        flags = ["--deepnorm", "--encoder-layers", layers, "--decoder-layers", layers, "--share-all-embeddings"]
        if checkpoint:
            flags.append("--checkpoint-activations")
        rss_start = common.peak_rss_mib()
        t0 = time.perf_counter()
        args, task, model, criterion, optimizer = common.build_trainable(data, ARCH, flags)
        build_s = time.perf_counter() - t0
        params = sum(p.numel() for p in model.parameters())
        sample = common.fixed_batch(task, sentences, length, length)
        rss_built = common.peak_rss_mib()
        losses: List[float] = []
        times: List[float] = []
        for update in range(warmup + updates):
            t = time.perf_counter()
            losses.append(common.train_step(task, model, criterion, optimizer, sample, update))
            if update >= warmup:
                times.append(time.perf_counter() - t)
        rss_peak = common.peak_rss_mib()
    return {
        "layers_per_side": layers,
        "total_layers": 2 * layers,
        "checkpoint_activations": checkpoint,
        "params": params,
        "tokens_per_batch": sentences * length,
        "build_s": build_s,
        "time_per_update_s": common.quantiles(times),
        "losses": losses,
        "losses_finite": all(math.isfinite(x) for x in losses),
        "peak_rss_mib": rss_peak,
        "peak_rss_source": "VmHWM (/proc/self/status)" if Path("/proc/self/status").exists() else "ru_maxrss",
        "ru_maxrss_mib": common.ru_maxrss_mib(),
        "rss_after_build_mib": rss_built,
        "rss_at_start_mib": rss_start,
        "training_rss_delta_mib": rss_peak - rss_built,
        "torch_threads": torch.get_num_threads(),
    }


def run_in_subprocess(
    layers: int, checkpoint: bool, updates: int, warmup: int, sentences: int, length: int, vocab: int
) -> Dict[str, Any]:
    """Run :func:`run_point` in a fresh Python process and return its JSON result."""
    cmd = [
        sys.executable, "-m", "benchmarks.depth", "--layers", str(layers), "--updates", str(updates),
        "--warmup", str(warmup), "--sentences", str(sentences), "--length", str(length), "--vocab", str(vocab),
    ]
    if checkpoint:
        cmd.append("--checkpoint-activations")
    proc = subprocess.run(cmd, cwd=common.REPO, env=common.child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"depth point {layers}L failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark(
    depths: Sequence[int], updates: int, warmup: int, sentences: int, length: int, vocab: int
) -> Dict[str, Any]:
    """All depth points, with and without activation checkpointing, plus linear fits of time vs layers."""
    points: List[Dict[str, Any]] = []
    for layers in depths:
        for checkpoint in (False, True):
            common.log(f"depth {layers}L-{layers}L checkpoint_activations={checkpoint}")
            point = run_in_subprocess(layers, checkpoint, updates, warmup, sentences, length, vocab)
            common.log(
                f"  {point['time_per_update_s']['median']:.3f} s/update, peak RSS {point['peak_rss_mib']:.0f} MiB, "
                f"loss {point['losses'][-1]:.3f}"
            )
            points.append(point)
    fits = {}
    for checkpoint in (False, True):
        sel = [p for p in points if p["checkpoint_activations"] == checkpoint]
        key = "checkpointed" if checkpoint else "plain"
        xs = [float(p["total_layers"]) for p in sel]
        fits[key] = {
            "time_vs_total_layers": common.linear_fit(xs, [p["time_per_update_s"]["median"] for p in sel]),
            "peak_rss_vs_total_layers": common.linear_fit(xs, [p["peak_rss_mib"] for p in sel]),
        }
    savings = []
    for layers in depths:
        plain = next(p for p in points if p["layers_per_side"] == layers and not p["checkpoint_activations"])
        ckpt = next(p for p in points if p["layers_per_side"] == layers and p["checkpoint_activations"])
        savings.append(
            {
                "layers_per_side": layers,
                "peak_rss_saved_mib": plain["peak_rss_mib"] - ckpt["peak_rss_mib"],
                "training_delta_saved_mib": plain["training_rss_delta_mib"] - ckpt["training_rss_delta_mib"],
                "peak_rss_ratio": ckpt["peak_rss_mib"] / plain["peak_rss_mib"],
                "time_ratio": ckpt["time_per_update_s"]["median"] / plain["time_per_update_s"]["median"],
            }
        )
    deepest = max(depths)
    deepest_points = [p for p in points if p["layers_per_side"] == deepest]
    return {
        "arch": f"{ARCH} --deepnorm --share-all-embeddings (64/128, 2 heads)",
        "batch": {"sentences": sentences, "src_len": length, "tgt_len": length, "vocab": vocab},
        "updates_timed": updates,
        "warmup_updates": warmup,
        "points": points,
        "fits": fits,
        "checkpointing": savings,
        "deepest": {
            "layers_per_side": deepest,
            "total_layers": 2 * deepest,
            "finite_loss": all(p["losses_finite"] for p in deepest_points),
            "updates_run": warmup + updates,
            "losses": {
                ("checkpointed" if p["checkpoint_activations"] else "plain"): p["losses"] for p in deepest_points
            },
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Child entry point: measure one depth point and print it as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--checkpoint-activations", action="store_true")
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sentences", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=1000)
    a = parser.parse_args(argv)
    result = run_point(a.layers, a.checkpoint_activations, a.updates, a.warmup, a.sentences, a.length, a.vocab)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
