"""Run the deepnet-fairseq benchmarks and write ``benchmarks/results/*.json`` + ``summary.md``.

    python benchmarks/run.py            # full run (~15-25 min on a 2-core CPU)
    python benchmarks/run.py --smoke    # one tiny configuration per benchmark (< 1 min)
    python benchmarks/run.py --only depth --out /tmp/bench

Benchmarks (see each module's docstring for the method):

1. ``overhead``: DeepNorm vs stock fairseq ``transformer``: training step time, beam-search time,
   memory, as interleaved A/B ratios (``benchmarks/overhead.py``).
2. ``depth``: time per update and peak RSS from 6L-6L to 500L-500L at tiny width, with and without
   ``--checkpoint-activations``, linear fit of time vs layers (``benchmarks/depth.py``).
3. ``paper``: the paper's 3.8B / 3.2B models built on the meta device: parameter counts and
   training-memory estimates (``benchmarks/paper_scale.py``).

Everything runs on the CPU with ``torch.set_num_threads(1)`` (and ``OMP_NUM_THREADS=1`` in the
subprocesses).  GPU numbers come from ``benchmarks/gpu.sh`` on a CUDA machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

BENCHMARKS = ("overhead", "depth", "paper", "serve")
BASE = (512, 2048, 8)
TINY = (64, 128, 2)


def overhead_configs(smoke: bool) -> List[Dict[str, Any]]:
    """Overhead configurations: 6L-6L and 18L-18L base (full) or one 1L-1L tiny (smoke)."""
    if smoke:
        return [dict(layers=1, width=TINY, sentences=4, length=8, vocab=200, pairs=2, warmup=1, gen_pairs=2,
                     gen_sentences=2, gen_len=4, beam=2, mem_pairs=1, mem_steps=1)]
    common_kw = dict(width=BASE, sentences=16, length=32, vocab=8000, warmup=1, gen_sentences=8, gen_len=16,
                     beam=4, mem_steps=2)
    return [
        dict(layers=6, pairs=10, gen_pairs=8, mem_pairs=2, **common_kw),
        dict(layers=18, pairs=6, gen_pairs=6, mem_pairs=2, **common_kw),
    ]


def depth_config(smoke: bool) -> Dict[str, Any]:
    """Depth-scaling settings: 6..500 layers per side (full) or 2 (smoke: one point per curve, each point
    costing a fresh subprocess; a fit through two points would be no more informative)."""
    if smoke:
        return dict(depths=[2], updates=1, warmup=0, sentences=4, length=8, vocab=200)
    return dict(depths=[6, 18, 50, 100, 250, 500], updates=3, warmup=1, sentences=16, length=32, vocab=1000)


def paper_config(smoke: bool) -> Dict[str, Any]:
    """Paper-scale settings; the smoke run builds 2L-2L versions with a small vocabulary."""
    from benchmarks import paper_scale

    if smoke:
        models = [{**m, "layers": 2, "name": m["name"] + " [smoke: 2L-2L]"} for m in paper_scale.PAPER_MODELS]
        return dict(models=models, vocabs=[1000], embeddings=["shared (1 matrix)"], tokens_per_gpu=4096)
    return dict(models=paper_scale.PAPER_MODELS, vocabs=[64000, 128000],
                embeddings=list(paper_scale.EMBEDDING_OPTIONS), tokens_per_gpu=4096)


def fmt_ratio(stats: Dict[str, float]) -> str:
    """``median [q1, q3] (min-max)`` of a ratio."""
    return f"{stats['median']:.3f} [{stats['q1']:.3f}, {stats['q3']:.3f}] ({stats['min']:.3f}-{stats['max']:.3f})"


def yes_no(flag: bool) -> str:
    """Markdown word for a met/missed target."""
    return "**met**" if flag else "**not met**"


def summarize(results: Dict[str, Any], meta: Dict[str, Any]) -> str:
    """Markdown summary of whatever benchmarks ran."""
    env = meta["environment"]
    lines = [
        "# deepnet-fairseq benchmark summary",
        "",
        f"Command: `{meta['command']}` ({'smoke' if meta['smoke'] else 'full'} mode), "
        f"finished {meta['finished']}, {meta['wall_s'] / 60:.1f} min.",
        f"Machine: {env['cpu_count']} CPU cores ({env['machine']}), no GPU; Python {env['python']}, "
        f"torch {env['torch']}, fairseq {env['fairseq']}; **torch.set_num_threads(1)** in every process; "
        f"1-min load average at start {env['load_average_1m']:.2f} (the machine is shared).",
        "",
    ]
    if "overhead" in results:
        ov = results["overhead"]
        lines += [
            "## 1. Overhead: `deepnet_transformer --deepnorm` vs fairseq `transformer`",
            "",
            "Ratios are DeepNorm / stock (lower is better), median of per-pair ratios, "
            "`[q1, q3]` interquartile range, `(min-max)` over pairs. Pairs are interleaved with alternating "
            "order (AB, BA, ...) after warm-up. Training step = fairseq `task.train_step` "
            "(label_smoothed_cross_entropy 0.1, forward + backward) + fairseq Adam step on one fixed batch. "
            "Generation = fairseq `SequenceGenerator` beam search with the output length forced "
            "(`min_len = max_len_b`), so both models decode the same number of steps. Memory = peak-RSS "
            "increase during training over the RSS after building (fresh subprocess per model, "
            "`VmHWM` of /proc/self/status), and the exact bytes autograd saves for backward (`saved_tensors_hooks`).",
            "",
            "| config | params | batch | step time ratio | generation time ratio | memory ratio (RSS delta) "
            "| saved-activation ratio |",
            "|---|---:|---|---|---|---|---:|",
        ]
        for c in ov["configs"]:
            g = c["generation_time"]["settings"]
            lines.append(
                f"| {c['config']} | {c['params'] / 1e6:.1f}M | {c['train_batch']['sentences']}x"
                f"{c['train_batch']['src_len']} tok, vocab {c['vocab']} | {fmt_ratio(c['train_step_time']['ratio'])} "
                f"| {fmt_ratio(c['generation_time']['ratio'])} | {fmt_ratio(c['memory']['training_delta']['ratio'])} "
                f"| {c['saved_activations']['ratio']:.4f} |"
            )
        lines += ["", "Absolute medians (stock vs DeepNorm):", ""]
        for c in ov["configs"]:
            st, gen, mem = c["train_step_time"], c["generation_time"], c["memory"]["training_delta"]
            g = gen["settings"]
            lines.append(
                f"- {c['config']}: step {st['stock']['median']:.3f} s vs {st['deepnorm']['median']:.3f} s "
                f"({st['ratio']['n']} pairs); beam {g['beam']}, {g['sentences']} sentences x "
                f"{g['forced_output_tokens']} tokens: {gen['stock_sentences_per_s']:.2f} vs "
                f"{gen['deepnorm_sentences_per_s']:.2f} sentences/s ({gen['ratio']['n']} pairs); "
                f"training RSS delta {mem['stock']['median']:.0f} vs {mem['deepnorm']['median']:.0f} MiB "
                f"(peak RSS {c['memory']['peak_rss']['stock']['median']:.0f} vs "
                f"{c['memory']['peak_rss']['deepnorm']['median']:.0f} MiB); saved activations "
                f"{c['saved_activations']['stock_mib']:.1f} vs {c['saved_activations']['deepnorm_mib']:.1f} MiB"
            )
        lines += ["", "Targets (median ratio; the IQR column says whether the whole interquartile range is inside):",
                  "", "| config | target | value | median | whole IQR |", "|---|---|---:|---|---|"]
        names = {
            "train_step_time": "step time <= 1.02",
            "generation_time": "generation time <= 1.02",
            "memory_training_delta": "memory (RSS delta) <= 1.01",
            "memory_saved_activations": "memory (saved activations) <= 1.01",
        }
        for c in ov["configs"]:
            for key, label in names.items():
                t = c["targets"][key]
                iqr = yes_no(t["iqr_within_target"]) if "iqr_within_target" in t else "exact"
                lines.append(f"| {c['config']} | {label} | {t['value']:.4f} | {yes_no(t['met'])} | {iqr} |")
        lines.append("")
    if "depth" in results:
        dp = results["depth"]
        b = dp["batch"]
        lines += [
            "## 2. Depth scaling (tiny width 64/128/2 heads, DeepNorm)",
            "",
            f"`{dp['arch']}`, batch {b['sentences']}x{b['src_len']} tokens, vocab {b['vocab']}; "
            f"{dp['warmup_updates']} warm-up + {dp['updates_timed']} timed updates per point (median), each point in "
            "its own subprocess; peak RSS = child's `VmHWM` "
            "(includes Python, torch and fairseq, ~400 MiB; `ru_maxrss` is not used because Linux carries the "
            "parent's peak into a child's `ru_maxrss`).",
            "",
            "| layers | params | s/update | s/update (ckpt) | peak RSS MiB | peak RSS MiB (ckpt) | saved by ckpt "
            "| final loss |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in dp["checkpointing"]:
            n = s["layers_per_side"]
            plain = next(p for p in dp["points"] if p["layers_per_side"] == n and not p["checkpoint_activations"])
            ckpt = next(p for p in dp["points"] if p["layers_per_side"] == n and p["checkpoint_activations"])
            lines.append(
                f"| {n}L-{n}L ({2 * n}) | {plain['params'] / 1e6:.2f}M | {plain['time_per_update_s']['median']:.3f} "
                f"| {ckpt['time_per_update_s']['median']:.3f} | {plain['peak_rss_mib']:.0f} "
                f"| {ckpt['peak_rss_mib']:.0f} "
                f"| {s['peak_rss_saved_mib']:.0f} MiB ({1 - s['peak_rss_ratio']:.0%}) | {plain['losses'][-1]:.3f} |"
            )
        fits = dp["fits"]
        lines += [""]
        for key, label in (("plain", "no checkpointing"), ("checkpointed", "--checkpoint-activations")):
            f = fits[key]["time_vs_total_layers"]
            lines.append(
                f"- time vs total layers, {label}: {f['slope'] * 1000:.2f} ms/layer + {f['intercept']:.3f} s, "
                f"R^2 = {f['r2']:.4f} (target > 0.99: {yes_no(f['r2'] > 0.99)})"
            )
        deepest = dp["deepest"]
        losses = "; ".join(f"{k}: " + ", ".join(f"{x:.3f}" for x in v) for k, v in deepest["losses"].items())
        lines += [
            f"- {deepest['layers_per_side']}L-{deepest['layers_per_side']}L ({deepest['total_layers']} layers): "
            f"{deepest['updates_run']} real updates, losses finite: {deepest['finite_loss']} ({losses})",
            "",
            "![depth scaling](depth_scaling.png)",
            "",
        ]
    if "paper" in results:
        pp = results["paper"]
        lines += [
            "## 3. Paper-scale models on the meta device",
            "",
            "Built with `task.build_model` under `with torch.device(\"meta\")` (no storage). Training memory per "
            "GPU = 16 bytes/param (fp16 weights 2 + fp16 grads 2 + fp32 master 4 + Adam m 4 + v 4), unsharded "
            f"and FSDP full-shard over {pp['fsdp_shards']} GPUs; checkpointed activations = one fp16 "
            "tokens x dim tensor per layer at 4096 tokens/GPU (a lower bound: the recomputed layer's own "
            "activations and temporaries come on top).",
            "",
            "| model | vocab | embeddings | params | vs paper | states/GPU unsharded | states/GPU FSDP-8 "
            "| + ckpt activations |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for m in pp["models"]:
            for v in m["variants"]:
                mem = v["memory"]
                lines.append(
                    f"| {m['name']} | {v['vocab']} | {v['embeddings']} | {v['params'] / 1e9:.3f}B "
                    f"| {v['vs_paper']:.3f} (paper {m['paper_params'] / 1e9:.1f}B) "
                    f"| {mem['states_unsharded_gib']:.1f} GiB "
                    f"| {mem['states_fsdp8_gib']:.1f} GiB | {mem['checkpointed_activations_gib']:.2f} GiB |"
                )
        lines.append("")
        for m in pp["models"]:
            c = m["closest_to_paper"]
            lines.append(
                f"- {m['name']}: {c['non_embedding_params'] / 1e9:.3f}B non-embedding parameters; closest to the "
                f"paper's {m['paper_params'] / 1e9:.1f}B: vocab {c['vocab']}, {c['embeddings']} = "
                f"{c['params'] / 1e9:.3f}B ({m['paper_note']})."
            )
        lines.append("")
    if "serve" in results:
        from benchmarks import serve

        lines += serve.summary_lines(results["serve"])
    return "\n".join(lines) + "\n"


def run_serve(smoke: bool) -> Dict[str, Any] | None:
    """Translation speed: fairseq-generate vs CTranslate2 float32/int8 (``benchmarks/serve.py``).

    Full mode uses the demo's DeepNorm model (``make demo`` first; skipped with a note otherwise), its
    CTranslate2 models under ``runs/serve_bench``; smoke mode a toy model in a temporary directory.
    """
    from benchmarks import serve

    if smoke:
        with tempfile.TemporaryDirectory(prefix="serve_smoke_") as work:
            return serve.benchmark(work=Path(work), repeats=1, **serve.smoke_inputs(Path(work) / "smoke"))
    try:
        inputs = serve.demo_inputs()
    except SystemExit as missing:
        common.log(f"serve benchmark skipped: {missing}")
        return None
    return serve.benchmark(work=common.REPO / "runs" / "serve_bench", repeats=3, **inputs)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``make bench``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one tiny configuration per benchmark (< 1 min)")
    parser.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    a = parser.parse_args(argv)

    common.single_thread()
    from benchmarks import depth, overhead, paper_scale, plot

    started = time.perf_counter()
    env = common.environment()
    command = "python benchmarks/run.py" + (" --smoke" if a.smoke else "")
    if set(a.only) != set(BENCHMARKS):
        command += " --only " + " ".join(a.only)
    results: Dict[str, Any] = {}
    a.out.mkdir(parents=True, exist_ok=True)
    mode = "smoke" if a.smoke else "full"
    common.log(f"{mode} run of {', '.join(a.only)} into {a.out}")
    if "overhead" in a.only:
        results["overhead"] = overhead.benchmark(overhead_configs(a.smoke))
    if "depth" in a.only:
        results["depth"] = depth.benchmark(**depth_config(a.smoke))
        plot.plot_depth(results["depth"], a.out / "depth_scaling.png")
    if "paper" in a.only:
        results["paper"] = paper_scale.benchmark(**paper_config(a.smoke))
    if "serve" in a.only:
        serve_result = run_serve(a.smoke)
        if serve_result is not None:
            results["serve"] = serve_result
    meta = {
        "command": command,
        "smoke": a.smoke,
        "environment": env,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_s": time.perf_counter() - started,
    }
    names = {"overhead": "overhead.json", "depth": "depth.json", "paper": "paper_scale.json", "serve": "serve.json"}
    for key, data in results.items():
        common.write_json(a.out / names[key], {"meta": meta, **data})
    common.write_json(a.out / "run.json", {**meta, "benchmarks": sorted(results)})
    summary = summarize(results, meta)
    (a.out / "summary.md").write_text(summary)
    print(summary)
    common.log(f"done in {meta['wall_s']:.0f} s; results in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
