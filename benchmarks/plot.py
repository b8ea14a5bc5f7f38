"""The depth-scaling figure: time per update and peak RSS vs layers, with and without checkpointing."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict


def plot_depth(depth: Dict[str, Any], path: Path) -> Path:
    """Draw ``depth.json``'s points and linear fits into a two-panel PNG at ``path``."""
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq leaves the root logger verbose
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {
        "plain": ("tab:blue", "o", "no checkpointing"),
        "checkpointed": ("tab:orange", "s", "--checkpoint-activations"),
    }
    for key, (color, marker, label) in styles.items():
        pts = [p for p in depth["points"] if p["checkpoint_activations"] == (key == "checkpointed")]
        xs = [p["total_layers"] for p in pts]
        times = [p["time_per_update_s"]["median"] for p in pts]
        rss = [p["peak_rss_mib"] for p in pts]
        fit = depth["fits"][key]["time_vs_total_layers"]
        ax_time.plot(xs, times, marker, color=color, label=f"{label} (R$^2$={fit['r2']:.4f})")
        lo, hi = min(xs), max(xs)
        ax_time.plot([lo, hi], [fit["slope"] * lo + fit["intercept"], fit["slope"] * hi + fit["intercept"]],
                     "-", color=color, alpha=0.6, linewidth=1)
        ax_mem.plot(xs, rss, marker + "-", color=color, label=label)
    batch = depth["batch"]
    ax_time.set_title("time per update (median)")
    ax_time.set_xlabel("total layers (encoder + decoder)")
    ax_time.set_ylabel("seconds")
    ax_time.legend(fontsize=8)
    ax_mem.set_title("peak RSS of the process (VmHWM)")
    ax_mem.set_xlabel("total layers (encoder + decoder)")
    ax_mem.set_ylabel("MiB")
    ax_mem.legend(fontsize=8)
    for ax in (ax_time, ax_mem):
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"deepnet_transformer_tiny --deepnorm (64/128/2 heads), CPU 1 thread, "
        f"batch {batch['sentences']}x{batch['src_len']} tokens",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
