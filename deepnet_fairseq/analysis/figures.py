"""The DeepNet paper's analysis figures at toy scale, as CSV + PNG.

* :func:`model_update_vs_depth` (paper Fig. 5): ``||F(x; theta_t) - F(x; theta_0)||`` on a fixed
  probe batch over the first updates, for tiny 64-128-2 models at several depths, per scheme.
  The paper's finding: Post-LN's update grows with depth, DeepNorm's stays nearly constant.
* :func:`gradients_and_ln_inputs` (paper Figs. 3-4): per-layer gradient norms and LayerNorm input
  norms over early training of 18L-18L Post-LN, Post-LN-init and DeepNorm.  The paper's finding:
  Post-LN's LN inputs grow and its lower layers' gradients vanish; Post-LN-init and DeepNorm don't.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Dict, List, Sequence

from deepnet_fairseq.analysis.toy_training import ToySetup, batches, build_model_and_task, train_toy


def _write_csv(path: Path, rows: List[Dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)


def _instrumented(data: Path, scheme: str, layers: int, setup: ToySetup):
    return build_model_and_task(data, scheme, layers, setup, ("--log-stability", "--stability-interval", "1"))


def model_update_vs_depth(
    data: Path, out: Path, depths: Sequence[int], schemes: Sequence[str], updates: int, setup: ToySetup
) -> List[Dict[str, object]]:
    """Fig. 5: writes ``fig5_model_update.csv`` and ``.png`` under ``out``; returns the rows."""
    rows: List[Dict[str, object]] = []
    for scheme in schemes:
        for layers in depths:
            started = time.time()
            args, task, model, criterion = _instrumented(data, scheme, layers, setup)

            def measure(update, sample, logged, scheme=scheme, layers=layers):
                rows.append({"scheme": scheme, "layers": layers, "update": update,
                             "model_update": logged.get("stab_update", math.nan)})

            losses = train_toy(model, criterion, batches(task, args, setup.seed), updates, setup, measure)
            print(f"fig5 {scheme:12s} {layers:3d}L-{layers}L: update norm after {updates} updates "
                  f"{rows[-1]['model_update']:.4f}, loss {losses[-1]:.3f} ({time.time() - started:.0f}s)", flush=True)
    _write_csv(out / "fig5_model_update.csv", rows)
    _plot_fig5(rows, out / "fig5_model_update.png", schemes, depths)
    return rows


def _plot_fig5(rows, path: Path, schemes: Sequence[str], depths: Sequence[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(schemes), figsize=(4.5 * len(schemes), 3.6), sharey=True, squeeze=False)
    for ax, scheme in zip(axes[0], schemes, strict=True):
        for layers in depths:
            points = [(r["update"], r["model_update"]) for r in rows if r["scheme"] == scheme and r["layers"] == layers]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=f"{layers}L-{layers}L")
        ax.set_title(scheme)
        ax.set_xlabel("update")
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("||F(x; theta_t) - F(x; theta_0)||")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Model update over early training (DeepNet Fig. 5, toy scale: 64-128-2)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gradients_and_ln_inputs(
    data: Path, out: Path, layers: int, schemes: Sequence[str], updates: int, setup: ToySetup, every: int
) -> List[Dict[str, object]]:
    """Figs. 3-4: writes ``fig3_4_gradients_ln.csv`` and ``.png`` under ``out``; returns the rows."""
    rows: List[Dict[str, object]] = []
    for scheme in schemes:
        started = time.time()
        args, task, model, criterion = _instrumented(data, scheme, layers, setup)

        def measure(update, sample, logged, scheme=scheme):
            for side in ("enc", "dec"):
                for index in range(1, layers + 1):
                    prefix = f"stab_{side}{index:02d}_"
                    gnorms = [v for k, v in logged.items() if k.startswith(prefix) and k.endswith("_gnorm")]
                    lns = [v for k, v in logged.items() if k.startswith(prefix) and k.endswith("_ln")]
                    rows.append({
                        "scheme": scheme, "update": update, "side": "encoder" if side == "enc" else "decoder",
                        "layer": index, "grad_norm": math.sqrt(sum(g * g for g in gnorms)),
                        "ln_input_norm": sum(lns) / len(lns) if lns else math.nan,
                    })

        train_toy(model, criterion, batches(task, args, setup.seed), updates, setup, measure, measure_every=every)
        print(f"fig3-4 {scheme:12s} {layers}L-{layers}L done ({time.time() - started:.0f}s)", flush=True)
    _write_csv(out / "fig3_4_gradients_ln.csv", rows)
    _plot_fig34(rows, out / "fig3_4_gradients_ln.png", schemes, layers)
    return rows


def _plot_fig34(rows, path: Path, schemes: Sequence[str], layers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_grad, ax_ln) = plt.subplots(1, 2, figsize=(10, 3.8))
    last = max(r["update"] for r in rows)
    for scheme in schemes:
        points = [r for r in rows if r["scheme"] == scheme and r["update"] == last and r["side"] == "decoder"]
        ax_grad.plot([r["layer"] for r in points], [r["grad_norm"] for r in points], marker="o", ms=3, label=scheme)
        updates = sorted({r["update"] for r in rows if r["scheme"] == scheme})
        top = [next(r["ln_input_norm"] for r in rows if r["scheme"] == scheme and r["update"] == u
                    and r["side"] == "decoder" and r["layer"] == layers) for u in updates]
        ax_ln.plot(updates, top, label=scheme)
    ax_grad.set(title=f"Decoder gradient norm per layer at update {last}", xlabel="layer", ylabel="||grad||",
                yscale="log")
    ax_ln.set(title=f"LN input norm ||x||/sqrt(d), top decoder layer ({layers})", xlabel="update", yscale="log")
    for ax in (ax_grad, ax_ln):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{layers}L-{layers}L early training (DeepNet Figs. 3-4, toy scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
