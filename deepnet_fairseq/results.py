"""A grid of runs (schemes x depths) as a Markdown/CSV table and as a BLEU-vs-depth plot.

One layout for ``deepnet-sweep`` (toy scale) and the recipes' ``scripts/collect_results.py`` (the paper's
Table 1, Figs. 6 and 8): rows are schemes, columns depths; a plot has one panel per group of schemes, our
runs as solid lines and reference values (the paper's, read off its figures) as dashed lines with markers.
Every plot is written twice: the PNG and, next to it, the same series as JSON (``<name>.json``), so the
numbers behind a figure can be read and checked without its pixels.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple


def markdown_grid(corner: str, columns: Sequence[str], rows: Sequence[Tuple[str, Sequence[str]]]) -> str:
    """A Markdown table: header ``| corner | columns... |``, one line per ``(label, cells)`` row."""
    lines = [f"| {corner} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, cells in rows:
        if len(cells) != len(columns):
            raise ValueError(f"row {label!r} has {len(cells)} cells for {len(columns)} columns")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """CSV with ``header``; ``None`` is written as an empty field."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if value is None else value for value in row] for row in rows)
    return buffer.getvalue()


@dataclass(frozen=True)
class Series:
    """One line of a plot: ``(depth, BLEU)`` points; ``reference`` marks values not from our runs (dashed)."""

    label: str
    points: Tuple[Tuple[float, float], ...]
    reference: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    series: Tuple[Series, ...]


def plot_bleu_vs_depth(panels: Sequence[Panel], path: Path, *, title: str, xlabel: str,
                       ylabel: str = "test BLEU (0 = diverged)", log_x: bool = False,
                       note: Optional[str] = None) -> Path:
    """Draw ``panels`` side by side into the PNG ``path``; write their series to ``path.with_suffix('.json')``
    and return that path. ``note`` is printed under the panels (e.g. where reference values come from)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        colors = {}
        for series in panel.series:
            xs = [p[0] for p in series.points]
            ys = [p[1] for p in series.points]
            key = series.label.split(":")[0]  # ours and the reference of one scheme share a colour
            style = dict(linestyle="--", marker="s", markerfacecolor="none", alpha=0.8) if series.reference \
                else dict(linestyle="-", marker="o")
            (line,) = ax.plot(xs, ys, label=series.label, color=colors.get(key), **style)
            colors.setdefault(key, line.get_color())
        ax.set(title=panel.title, xlabel=xlabel)
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if panel.series:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    if note:
        fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=8, style="italic")
    fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    data = {"title": title, "xlabel": xlabel, "ylabel": ylabel, "log_x": log_x, "note": note,
            "panels": [asdict(panel) for panel in panels]}
    json_path = path.with_suffix(".json")
    json_path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return json_path
