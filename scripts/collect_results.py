#!/usr/bin/env python3
"""Collect a grid of recipe runs into the paper's Table 1 layout (rows = schemes, columns = depths).

    python scripts/collect_results.py runs/recipes/wmt17 --recipe wmt17 --markdown table.md --csv table.csv

Every run directory below GRID (any depth) that has a ``train.log`` is one cell.  Its scheme and depths
come from ``run.json`` (written by the recipes' train.sh), else from a directory name such as
``deepnorm-18L-18L``.  A cell is

* **diverged** when ``exit_code`` is 3 (the plugin's ``--stop-on-divergence-patience`` exit), the log
  says "Training diverged" / ``FloatingPointError`` / a NaN or inf loss, or the loss blew up (the last
  logged training loss is above ``--blowup-factor`` times the lowest one);
* the BLEU of ``eval/bleu.json`` (``bleu``: tokenized BLEU for WMT/IWSLT, sacreBLEU for OPUS) otherwise;
* ``running``/``failed``/``no eval`` when training has not finished, crashed, or was not evaluated.

Logs may be fairseq's json format (``"loss": "4.2"``) or its simple format (``loss=4.2``).  With
``--recipe wmt17`` every cell is printed next to the paper's Table 1 value; with ``--recipe opus100`` the
paper's Table 2 follows our runs (both from ``deepnet_recipes/paper.py``, checked against the paper).

``--plot FILE.png`` draws our BLEU against depth next to the paper's figure: Fig. 6 for ``--recipe iwslt14``
(three panels, Table 1's LN groups, each with DeepNet), Fig. 8 for ``--recipe opus100`` (average BLEU vs total
layers). The paper's values are read off its figures, so approximate, and labelled so; a diverged run is
plotted at 0 BLEU, as the paper does.  The plotted series are also written to FILE.json.  The table layout
and the plot are :mod:`deepnet_fairseq.results`, shared with ``deepnet-sweep``.

    python scripts/collect_results.py runs/recipes/iwslt14_sweep --recipe iwslt14 --plot fig6.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deepnet_recipes.paper import (  # noqa: E402
    FIG6_APPROX,
    FIG6_PANELS,
    FIG8_APPROX,
    SCHEME_LABEL,
    TABLE1,
    TABLE1_DEPTHS,
    TABLE2,
    table1_value,
)

from deepnet_fairseq.results import Panel, Series, csv_text, markdown_grid, plot_bleu_vs_depth  # noqa: E402

SCHEME_ORDER = list(TABLE1)
NAME = re.compile(r"^(?P<scheme>.+?)[-_](?P<enc>\d+)L-(?P<dec>\d+)L$")
JSON_LOSS = re.compile(r'"(?:train_)?loss":\s*"?([^",}]+)"?')
SIMPLE_LOSS = re.compile(r"\bloss[=\s]+([-+0-9.eE]+|nan|inf|-inf)\b", re.IGNORECASE)
DIVERGED_TEXT = ("Training diverged", "FloatingPointError", "Minimum loss scale reached")


@dataclass
class Cell:
    scheme: str
    encoder_layers: int
    decoder_layers: int
    status: str  # ok | diverged | running | failed | no eval
    bleu: Optional[float]
    sacrebleu: Optional[float]
    reason: str
    path: Path

    @property
    def depth(self) -> str:
        return f"{self.encoder_layers}L-{self.decoder_layers}L"

    def text(self) -> str:
        if self.status == "ok" and self.bleu is not None:
            return f"{self.bleu:.1f}"
        return self.status


def train_losses(log: Path) -> List[float]:
    losses = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if "train_inner" not in line and "| train |" not in line:
            continue
        match = JSON_LOSS.search(line) if "{" in line else SIMPLE_LOSS.search(line)
        if match:
            try:
                losses.append(float(match.group(1)))
            except ValueError:
                losses.append(math.nan)
    return losses


def divergence(run: Path, blowup: float) -> Optional[str]:
    code = (run / "exit_code").read_text().strip() if (run / "exit_code").exists() else None
    if code == "3":
        return "exit code 3 (--stop-on-divergence-patience)"
    log = run / "train.log"
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    for marker in DIVERGED_TEXT:
        if marker in text:
            return f"log: {marker}"
    losses = train_losses(log) if log.exists() else []
    if any(not math.isfinite(x) for x in losses):
        return "non-finite training loss"
    finite = [x for x in losses if math.isfinite(x)]
    if len(finite) >= 2 and finite[-1] > blowup * min(finite):
        return f"loss blew up ({min(finite):.3g} -> {finite[-1]:.3g})"
    return None


def read_cell(run: Path, blowup: float) -> Optional[Cell]:
    info = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    match = NAME.match(run.name)
    scheme = info.get("scheme") or (match and match.group("scheme"))
    enc = info.get("encoder_layers") or (match and int(match.group("enc")))
    dec = info.get("decoder_layers") or (match and int(match.group("dec")))
    if not scheme or not enc or not dec:
        return None
    bleu = sacre = None
    reason = divergence(run, blowup)
    exit_code = (run / "exit_code").read_text().strip() if (run / "exit_code").exists() else None
    eval_json = run / "eval" / "bleu.json"
    if reason:
        status = "diverged"
    elif exit_code is None:
        status, reason = "running", "no exit_code yet"
    elif exit_code != "0":
        status, reason = "failed", f"exit code {exit_code}"
    elif not eval_json.exists():
        status, reason = "no eval", "run evaluate.sh"
    else:
        result = json.loads(eval_json.read_text())
        status, bleu, sacre = "ok", result.get("bleu"), result.get("sacrebleu")
        reason = result.get("signature") or ""
    return Cell(str(scheme), int(enc), int(dec), status, bleu, sacre, reason or "", run)


def collect(grid: Path, blowup: float) -> List[Cell]:
    cells = []
    for log in sorted(grid.rglob("train.log")):
        cell = read_cell(log.parent, blowup)
        if cell is not None:
            cells.append(cell)
    return cells


def paper_value(recipe: str, scheme: str, cell_depth: Tuple[int, int]) -> Optional[str]:
    """The paper's Table 1 cell for a WMT-17 run (None for other recipes, unequal depths or schemes not in it)."""
    if recipe != "wmt17" or cell_depth[0] != cell_depth[1]:
        return None
    return table1_value(scheme, cell_depth[0])


def build_table(cells: List[Cell], recipe: str) -> Tuple[List[str], List[str], Dict[Tuple[str, str], Cell]]:
    by_key = {(c.scheme, c.depth): c for c in cells}
    depths = sorted({(c.encoder_layers, c.decoder_layers) for c in cells})
    schemes = sorted({c.scheme for c in cells}, key=lambda s: (SCHEME_ORDER.index(s) if s in SCHEME_ORDER else 99, s))
    if recipe == "wmt17":
        depths = sorted(set(depths) | {(d, d) for d in TABLE1_DEPTHS})
        schemes = SCHEME_ORDER + [s for s in schemes if s not in SCHEME_ORDER]
    return schemes, [f"{e}L-{d}L" for e, d in depths], by_key


def markdown(cells: List[Cell], recipe: str) -> str:
    schemes, depths, by_key = build_table(cells, recipe)
    with_paper = recipe == "wmt17"
    rows = []
    for scheme in schemes:
        row = []
        for depth in depths:
            cell = by_key.get((scheme, depth))
            ours = cell.text() if cell else "-"
            if with_paper:
                enc, dec = (int(x) for x in depth.replace("L", "").split("-"))
                ours += f" ({paper_value(recipe, scheme, (enc, dec)) or '-'})"
            row.append(ours)
        rows.append((SCHEME_LABEL.get(scheme, scheme) if with_paper else scheme, row))
    out = [markdown_grid("Model", depths, rows)]
    if with_paper:
        out.append("")
        out.append("Cells: ours (paper). Paper: Table 1 of Wang et al. 2022 (arXiv 2203.00555), WMT-17 En-De test "
                   "BLEU, fairseq's built-in BLEU. Ours \"diverged\": exit code 3, NaN/inf, or the loss blew up.")
    if recipe == "opus100":
        out += ["", table2_markdown()]
    return "\n".join(out) + "\n"


def table2_markdown() -> str:
    """The paper's Table 2 (OPUS-100 average sacreBLEU), to read our opus100 runs against."""
    lines = ["Paper, Table 2 (OPUS-100 average sacreBLEU):", "",
             "| Model | Layers | Params | X->En | En->X | Avg |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.model} | {r.layers} | {r.params} | {r.x_en} | {r.en_x} | {r.avg} |" for r in TABLE2]
    return "\n".join(lines)


def to_csv(cells: List[Cell], recipe: str) -> str:
    schemes, depths, by_key = build_table(cells, recipe)
    rows = []
    for scheme in schemes:
        for depth in depths:
            cell = by_key.get((scheme, depth))
            enc, dec = (int(x) for x in depth.replace("L", "").split("-"))
            paper = paper_value(recipe, scheme, (enc, dec))
            if cell is None and paper is None:
                continue
            rows.append([scheme, depth, cell.status if cell else "not run", cell and cell.bleu,
                         cell and cell.sacrebleu, paper, cell.reason if cell else "", str(cell.path) if cell else ""])
    return csv_text(["scheme", "depth", "status", "bleu", "sacrebleu", "paper", "detail", "run"], rows)


def plotted_bleu(cell: Cell) -> Optional[float]:
    """A cell's point on a BLEU-vs-depth plot: its BLEU, 0 when it diverged (as the paper plots it), else none."""
    if cell.status == "diverged":
        return 0.0
    return cell.bleu if cell.status == "ok" else None


def paper_series(label: str, figure: str, values: Dict[int, float]) -> Series:
    return Series(f"{label}: paper, read off {figure} (approximate)", tuple(sorted(values.items())), reference=True)


def fig6_panels(cells: List[Cell]) -> List[Panel]:
    """Fig. 6's three panels: our NL-NL runs per scheme (x = N) and the values read off the paper's figure."""
    panels = []
    for title, schemes in FIG6_PANELS:
        series = []
        for scheme in schemes:
            label = SCHEME_LABEL[scheme]
            ours = sorted((c.encoder_layers, plotted_bleu(c)) for c in cells if c.scheme == scheme
                          and c.encoder_layers == c.decoder_layers and plotted_bleu(c) is not None)
            if ours:
                series.append(Series(label, tuple(ours)))
            if scheme in FIG6_APPROX:
                series.append(paper_series(label, "Fig. 6", FIG6_APPROX[scheme]))
        panels.append(Panel(title, tuple(series)))
    return panels


def fig8_panels(cells: List[Cell]) -> List[Panel]:
    """Fig. 8: average BLEU against total layers (encoder + decoder), ours per scheme and the paper's DeepNet."""
    series = []
    for scheme in sorted({c.scheme for c in cells}):
        ours = sorted((c.encoder_layers + c.decoder_layers, plotted_bleu(c)) for c in cells
                      if c.scheme == scheme and plotted_bleu(c) is not None)
        if ours:
            series.append(Series(SCHEME_LABEL.get(scheme, scheme), tuple(ours)))
    series.append(paper_series(SCHEME_LABEL["deepnorm"], "Fig. 8", FIG8_APPROX))
    return [Panel("OPUS-100", tuple(series))]


FIGURES = {  # recipe -> (panels, title, x label, log x)
    "iwslt14": (fig6_panels, "IWSLT-14 De-En test BLEU vs depth (DeepNet Fig. 6)", "N (NL-NL model)", False),
    "opus100": (fig8_panels, "OPUS-100 average BLEU vs depth (DeepNet Fig. 8)", "total layers (encoder + decoder)",
                True),
}


def plot(cells: List[Cell], recipe: str, path: Path) -> Path:
    """The recipe's figure with the paper's approximate values; returns the JSON of the plotted series."""
    panels, title, xlabel, log_x = FIGURES[recipe]
    return plot_bleu_vs_depth(panels(cells), path, title=title, xlabel=xlabel, log_x=log_x,
                              note="dashed: the paper's values, read off the figure (approximate); "
                                   "solid: our runs; diverged = 0")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path, help="directory holding the run directories")
    parser.add_argument("--recipe", choices=("wmt17", "iwslt14", "opus100", "none"), default="wmt17",
                        help="wmt17 adds the paper's Table 1 numbers (default); opus100 prints its Table 2")
    parser.add_argument("--markdown", type=Path, help="also write the Markdown table here")
    parser.add_argument("--csv", type=Path, help="write the CSV here (default: printed after the Markdown)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="--recipe iwslt14: Fig. 6; opus100: Fig. 8; ours next to the paper's values (+ FILE.json)")
    parser.add_argument("--blowup-factor", type=float, default=1.5,
                        help="diverged when the last training loss > FACTOR x the lowest one (default 1.5)")
    args = parser.parse_args(argv)
    if not args.grid.is_dir():
        parser.error(f"{args.grid}: no such directory")
    if args.blowup_factor <= 1:
        parser.error("--blowup-factor must be > 1")
    if args.plot and args.recipe not in FIGURES:
        parser.error(f"--plot: the paper's figures are for --recipe {' or '.join(FIGURES)} (Figs. 6 and 8); "
                     f"--recipe {args.recipe} is a table")
    cells = collect(args.grid, args.blowup_factor)
    if not cells:
        print(f"collect_results.py: error: no run directories with a train.log under {args.grid}", file=sys.stderr)
        return 1
    table, table_csv = markdown(cells, args.recipe), to_csv(cells, args.recipe)
    print(table)
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    if args.csv:
        args.csv.write_text(table_csv, encoding="utf-8")
    else:
        print(table_csv)
    if args.plot:
        print(f"wrote {args.plot} and {plot(cells, args.recipe, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
