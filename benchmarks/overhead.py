"""Overhead of ``deepnet_transformer --deepnorm`` over fairseq's stock ``transformer``.

Both models have identical shapes (same width, depth, vocabulary, ``--share-all-embeddings``, dropout)
and see the identical fixed batch; they differ only in DeepNorm's residual ``LN(alpha * x + G(x))``
(one extra scalar multiply per sub-layer) and its initialisation.  Three measurements:

* **training step**: wall time of one full update (fairseq ``task.train_step`` = forward with the
  ``label_smoothed_cross_entropy`` criterion + backward, then fairseq's Adam step), interleaved in
  pairs with alternating order (A B, B A, A B, ...) after warm-up, so slow drifts of a shared machine
  hit both models alike; the statistic is the per-pair ratio DeepNorm / stock.
* **generation**: beam search with fairseq's ``SequenceGenerator`` (``task.build_generator``),
  interleaved the same way.  Randomly initialised models would stop at different lengths, so the
  output length is forced (``min_len == max_len_b``, ``max_len_a = 0``): both models decode exactly
  the same number of steps and the comparison is per decoding step, not per luck.
* **memory**: (a) peak RSS in a fresh subprocess per model (``VmHWM`` after the training steps
  minus ``VmHWM`` right after building the model), i.e. what training adds on top of the
  weights: gradients, Adam moments, activations and allocator slack; (b) the exact bytes of the
  tensors autograd saves for backward during one training step (``saved_tensors_hooks``, unique
  storages, parameters excluded), a deterministic measure of activation memory independent of
  glibc's allocator.  CPU PyTorch has no peak-allocation counter like ``torch.cuda.max_memory_allocated``,
  which is why both are given.

All ratios are DeepNorm / stock: below 1 means DeepNorm is cheaper, above 1 costlier.
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

STOCK = ("transformer", [])
DEEPNORM = ("deepnet_transformer", ["--deepnorm"])
TARGETS = {"train_step_time": 1.02, "generation_time": 1.02, "memory": 1.01}


def shape_flags(layers: int, width: Sequence[int]) -> List[str]:
    """Flags giving both models the same depth, width (dim, FFN dim, heads) and shared embeddings."""
    dim, ffn, heads = width
    flags: List[str] = ["--encoder-layers", str(layers), "--decoder-layers", str(layers), "--share-all-embeddings"]
    for side in ("encoder", "decoder"):
        flags += [f"--{side}-embed-dim", str(dim), f"--{side}-ffn-embed-dim", str(ffn)]
        flags += [f"--{side}-attention-heads", str(heads)]
    return flags


def saved_activation_bytes(task: Any, model: Any, criterion: Any, optimizer: Any, sample: Dict[str, Any]) -> int:
    """Bytes of the unique non-parameter storages autograd saves for backward in one training step."""
    import torch

    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[int, int] = {}

    def pack(tensor):
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in param_ptrs:
                seen[ptr] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        common.train_step(task, model, criterion, optimizer, sample, 0)
    return sum(seen.values())


def ratio_stats(a: Sequence[float], b: Sequence[float]) -> Dict[str, Any]:
    """Per-pair ratios b/a and their quantiles, plus the medians of a and b."""
    ratios = [y / x for x, y in zip(a, b, strict=True) if x > 0]
    return {
        # an RSS delta can be 0 for tiny models (the peak was set while building): no ratio then
        "ratio": common.quantiles(ratios or [1.0]),
        "ratio_defined": bool(ratios),
        "per_pair_ratios": ratios,
        "stock": common.quantiles(a),
        "deepnorm": common.quantiles(b),
    }


def interleaved(run_a, run_b, pairs: int, warmup: int) -> Dict[str, Any]:
    """Time ``run_a``/``run_b`` in ``pairs`` pairs, order alternating A B / B A, after ``warmup`` each."""
    for _ in range(warmup):
        run_a()
        run_b()
    times_a: List[float] = []
    times_b: List[float] = []
    for i in range(pairs):
        if i % 2 == 0:
            times_a.append(common.timed(run_a))
            times_b.append(common.timed(run_b))
        else:
            times_b.append(common.timed(run_b))
            times_a.append(common.timed(run_a))
    return ratio_stats(times_a, times_b)


def memory_child(arch: str, flags: Sequence[str], sentences: int, length: int, vocab: int, steps: int) -> Dict:
    """In a fresh process: peak RSS after ``steps`` training steps, and the RSS right after building."""
    common.single_thread()
    with tempfile.TemporaryDirectory() as tmp, common.quiet_logging():
        data = common.write_dictionary(Path(tmp), vocab)
        args, task, model, criterion, optimizer = common.build_trainable(data, arch, flags)
        sample = common.fixed_batch(task, sentences, length, length)
        built = common.peak_rss_mib()
        for update in range(steps):
            common.train_step(task, model, criterion, optimizer, sample, update)
        peak = common.peak_rss_mib()
    return {"rss_after_build_mib": built, "peak_rss_mib": peak, "training_delta_mib": peak - built}


def memory_in_subprocess(arch: str, flags: Sequence[str], sentences: int, length: int, vocab: int, steps: int) -> Dict:
    """Run :func:`memory_child` in a fresh interpreter and return its JSON line."""
    cmd = [
        sys.executable, "-m", "benchmarks.overhead", "--memory-child", "--arch", arch,
        "--sentences", str(sentences), "--length", str(length), "--vocab", str(vocab), "--steps", str(steps),
        "--flags", json.dumps(list(flags)),
    ]
    proc = subprocess.run(cmd, cwd=common.REPO, env=common.child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {arch} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark_depth(
    layers: int,
    width: Sequence[int],
    sentences: int,
    length: int,
    vocab: int,
    pairs: int,
    warmup: int,
    gen_pairs: int,
    gen_sentences: int,
    gen_len: int,
    beam: int,
    mem_pairs: int,
    mem_steps: int,
) -> Dict[str, Any]:
    """All overhead measurements for one depth (``layers`` per side)."""
    import torch

    shape = shape_flags(layers, width)
    label = f"{layers}L-{layers}L {width[0]}/{width[1]}/{width[2]}"
    result: Dict[str, Any] = {
        "config": label,
        "layers_per_side": layers,
        "width": {"dim": width[0], "ffn": width[1], "heads": width[2]},
        "vocab": vocab,
        "train_batch": {"sentences": sentences, "src_len": length, "tgt_len": length, "tokens": sentences * length},
    }
    with tempfile.TemporaryDirectory() as tmp, common.quiet_logging():
        data = common.write_dictionary(Path(tmp), vocab)
        stock = common.build_trainable(data, STOCK[0], STOCK[1] + shape)
        deep = common.build_trainable(data, DEEPNORM[0], DEEPNORM[1] + shape)
        result["params"] = sum(p.numel() for p in stock[2].parameters())
        assert result["params"] == sum(p.numel() for p in deep[2].parameters())
        sample = common.fixed_batch(stock[1], sentences, length, length)
        updates = {"stock": 0, "deepnorm": 0}

        def step(which: str, built) -> None:
            _, task, model, criterion, optimizer = built
            common.train_step(task, model, criterion, optimizer, sample, updates[which])
            updates[which] += 1

        common.log(f"overhead {label}: training step, {pairs} interleaved pairs after {warmup} warm-up each")
        result["train_step_time"] = interleaved(
            lambda: step("stock", stock), lambda: step("deepnorm", deep), pairs, warmup
        )
        common.log(f"  step ratio {result['train_step_time']['ratio']['median']:.4f}")

        stock_saved = saved_activation_bytes(stock[1], stock[2], stock[3], stock[4], sample)
        deep_saved = saved_activation_bytes(deep[1], deep[2], deep[3], deep[4], sample)
        result["saved_activations"] = {
            "stock_mib": stock_saved / 2**20,
            "deepnorm_mib": deep_saved / 2**20,
            "ratio": deep_saved / stock_saved,
        }

        gen_args = argparse.Namespace(beam=beam, max_len_a=0, max_len_b=gen_len, min_len=gen_len)
        gen_sample = common.fixed_batch(stock[1], gen_sentences, length, length, seed=1)
        generators = {}
        for name, built in (("stock", stock), ("deepnorm", deep)):
            built[2].eval()
            generators[name] = built[1].build_generator([built[2]], gen_args)

        def generate(name: str, built) -> None:
            with torch.no_grad():
                hyps = built[1].inference_step(generators[name], [built[2]], gen_sample)
            lengths = {len(h[0]["tokens"]) for h in hyps}
            if lengths != {gen_len + 1}:  # gen_len tokens + EOS
                raise RuntimeError(f"forced generation length not respected: {lengths}")

        common.log(f"overhead {label}: beam-{beam} generation, {gen_pairs} interleaved pairs")
        gen = interleaved(lambda: generate("stock", stock), lambda: generate("deepnorm", deep), gen_pairs, 1)
        for key in ("stock", "deepnorm"):
            gen[f"{key}_sentences_per_s"] = gen_sentences / gen[key]["median"]
        gen["settings"] = {
            "beam": beam, "sentences": gen_sentences, "src_len": length, "forced_output_tokens": gen_len,
        }
        result["generation_time"] = gen
        common.log(f"  generation time ratio {gen['ratio']['median']:.4f}")
        stock = deep = None  # free both models before the memory subprocesses
        generators.clear()

    common.log(f"overhead {label}: peak RSS, {mem_pairs} pairs of fresh subprocesses")
    mem_a: List[Dict] = []
    mem_b: List[Dict] = []
    for i in range(mem_pairs):
        order = [("stock", STOCK), ("deepnorm", DEEPNORM)]
        if i % 2:
            order.reverse()
        for name, (arch, flags) in order:
            got = memory_in_subprocess(arch, flags + shape, sentences, length, vocab, mem_steps)
            (mem_a if name == "stock" else mem_b).append(got)
    result["memory"] = {
        "training_delta": ratio_stats(
            [m["training_delta_mib"] for m in mem_a], [m["training_delta_mib"] for m in mem_b]
        ),
        "peak_rss": ratio_stats([m["peak_rss_mib"] for m in mem_a], [m["peak_rss_mib"] for m in mem_b]),
        "steps_per_child": mem_steps,
    }
    common.log(f"  memory (training RSS delta) ratio {result['memory']['training_delta']['ratio']['median']:.4f}")
    result["targets"] = {
        "train_step_time": target_check(result["train_step_time"]["ratio"], TARGETS["train_step_time"]),
        "generation_time": target_check(result["generation_time"]["ratio"], TARGETS["generation_time"]),
        "memory_training_delta": target_check(result["memory"]["training_delta"]["ratio"], TARGETS["memory"]),
        "memory_saved_activations": {
            "target": TARGETS["memory"],
            "value": result["saved_activations"]["ratio"],
            "met": result["saved_activations"]["ratio"] <= TARGETS["memory"],
        },
    }
    return result


def target_check(stats: Dict[str, float], target: float) -> Dict[str, Any]:
    """Whether the median ratio meets ``target``, and whether the whole IQR does."""
    return {
        "target": target,
        "value": stats["median"],
        "met": stats["median"] <= target,
        "iqr_within_target": stats["q3"] <= target,
    }


def benchmark(configs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Run :func:`benchmark_depth` for every configuration."""
    started = time.perf_counter()
    results = [benchmark_depth(**cfg) for cfg in configs]
    return {
        "stock": "fairseq transformer",
        "deepnorm": "deepnet_transformer --deepnorm",
        "ratio_definition": "DeepNorm / stock (time per step, time per generated batch, memory); lower is better",
        "criterion": "label_smoothed_cross_entropy (0.1)",
        "optimizer": "fairseq adam, betas (0.9, 0.98)",
        "threads": 1,
        "targets": TARGETS,
        "configs": results,
        "wall_s": time.perf_counter() - started,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Child entry point (``--memory-child``) used for the peak-RSS measurement."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory-child", action="store_true", required=True)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--flags", default="[]", help="JSON list of extra fairseq flags")
    parser.add_argument("--sentences", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=2)
    a = parser.parse_args(argv)
    print(json.dumps(memory_child(a.arch, json.loads(a.flags), a.sentences, a.length, a.vocab, a.steps)))


if __name__ == "__main__":
    main()
