"""``deepnet-sweep``: the DeepNet paper's Table 1 / Fig. 6 at toy scale on the bundled data.

Every scheme x depth is trained with ``fairseq-train`` for the same number of updates and the same
settings (the demo's: d=64, FFN 256, 4 heads, shared embeddings, Adam (0.9, 0.98), lr 1.5e-3,
inverse_sqrt with 200 warmup updates, 2000 tokens per batch, dropout 0.2), then translated with
``fairseq-generate`` and scored with sacreBLEU.  A run is "diverged" when training stopped on
NaN/inf (``--stop-on-divergence-patience 1`` exits with code 3) or its last validation loss is above
its first.  Prints the table in the paper's layout (rows = schemes, columns = depths) as Markdown,
writes it as CSV and a BLEU-vs-depth PNG.  Resumable: finished runs (``result.json``) are skipped;
every run keeps its logs under ``--out/<scheme>_<N>L``.

    deepnet-sweep                                   # default grid: 35 min on a busy 2-core machine
    deepnet-sweep --schemes post-ln deepnorm --depths 6 12 --updates 100 --out runs/quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from deepnet_fairseq.analysis.data import data_or_bundled
from deepnet_fairseq.cli.arguments import require_positive
from deepnet_fairseq.divergence import DIVERGED_EXIT_CODE
from deepnet_fairseq.evaluation import score_generate_output
from deepnet_fairseq.results import Panel, Series, csv_text, markdown_grid, plot_bleu_vs_depth
from deepnet_fairseq.schemes import SCHEME_NAMES

USER_DIR = Path(__file__).resolve().parent.parent  # the installed plugin package, for --user-dir
DEFAULT_SCHEMES = ("post-ln", "pre-ln", "deepnorm")
DEFAULT_DEPTHS = (6, 18)


def tool(name: str) -> str:
    """A console script next to this interpreter (the project's venv), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def train_command(data: Path, run_dir: Path, scheme: str, layers: int, args) -> List[str]:
    return [
        tool("fairseq-train"), str(data), "--user-dir", str(USER_DIR), "--arch", "deepnet_transformer",
        "--residual-scheme", scheme, "--encoder-layers", str(layers), "--decoder-layers", str(layers),
        "--encoder-embed-dim", str(args.dim), "--decoder-embed-dim", str(args.dim),
        "--encoder-ffn-embed-dim", str(4 * args.dim), "--decoder-ffn-embed-dim", str(4 * args.dim),
        "--encoder-attention-heads", "4", "--decoder-attention-heads", "4", "--share-all-embeddings",
        "--dropout", "0.2", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", str(args.lr), "--lr-scheduler", "inverse_sqrt",
        "--warmup-updates", str(args.warmup), "--warmup-init-lr", "1e-7", "--max-tokens", str(args.max_tokens),
        "--max-update", str(args.updates), "--validate-interval-updates", str(max(args.updates // 4, 1)),
        "--seed", "1", "--cpu", "--num-workers", "0", "--required-batch-size-multiple", "1",
        "--log-format", "json", "--log-interval", "10", "--no-progress-bar", "--no-epoch-checkpoints",
        "--no-save-optimizer-state", "--stop-on-divergence-patience", "1", "--save-dir", str(run_dir / "checkpoints"),
    ]


def generate_command(data: Path, run_dir: Path) -> List[str]:
    return [
        tool("fairseq-generate"), str(data), "--user-dir", str(USER_DIR), "--path",
        str(run_dir / "checkpoints" / "checkpoint_last.pt"), "--gen-subset", "test", "--beam", "4",
        "--batch-size", "64", "--max-len-a", "1.5", "--max-len-b", "10", "--remove-bpe", "sentencepiece",
        "--cpu", "--num-workers", "0",
    ]


def valid_losses(log: str) -> List[float]:
    losses = []
    for line in log.splitlines():
        start = line.find("{")
        if "| valid |" in line and start >= 0:
            losses.append(float(json.loads(line[start:])["valid_loss"]))
    return losses


def run_one(data: Path, reference: Path, out: Path, scheme: str, layers: int, args) -> Dict[str, object]:
    """Train, translate and score one grid cell (skipped when its result.json exists)."""
    run_dir = out / f"{scheme}_{layers}L"
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    started = time.time()
    with open(run_dir / "train.log", "w") as log:
        code = subprocess.run(train_command(data, run_dir, scheme, layers, args), stdout=log,
                              stderr=subprocess.STDOUT, env=env).returncode
    text = (run_dir / "train.log").read_text()
    if code not in (0, DIVERGED_EXIT_CODE):
        raise RuntimeError(f"fairseq-train failed for {scheme} {layers}L (exit {code}); see {run_dir / 'train.log'}")
    losses = valid_losses(text)
    diverged = code == DIVERGED_EXIT_CODE or any(not math.isfinite(v) for v in losses) or (
        len(losses) > 1 and losses[-1] > losses[0]
    )
    bleu = None
    if code == 0:
        with open(run_dir / "generate.out", "w") as gen:
            subprocess.run(generate_command(data, run_dir), stdout=gen, stderr=subprocess.DEVNULL, env=env, check=True)
        bleu = score_generate_output(run_dir / "generate.out", reference, run_dir / "test.hyp",
                                     run_dir / "bleu.json")["bleu"]
    result = {
        "scheme": scheme, "layers": layers, "updates": args.updates, "exit_code": code, "diverged": diverged,
        "valid_losses": losses, "final_valid_loss": losses[-1] if losses else None, "bleu": bleu,
        "seconds": round(time.time() - started, 1),
    }
    result_path.write_text(json.dumps(result, indent=1))
    state = "diverged" if diverged else f"BLEU {bleu:.2f}"
    print(f"{scheme:12s} {layers:3d}L-{layers}L: {state}, valid loss {result['final_valid_loss']} "
          f"({result['seconds']:.0f}s)", flush=True)
    return result


def cell(result: Dict[str, object]) -> str:
    if result["diverged"]:
        return "diverged"
    return f"{result['bleu']:.2f} ({result['final_valid_loss']:.2f})"


def table(results: Sequence[Dict[str, object]], schemes: Sequence[str], depths: Sequence[int]) -> str:
    """Markdown in the paper's Table 1 layout: BLEU (final validation loss) or "diverged"."""
    by_key = {(r["scheme"], r["layers"]): r for r in results}
    rows = [(scheme, [cell(by_key[(scheme, d)]) if (scheme, d) in by_key else "-" for d in depths])
            for scheme in schemes]
    return markdown_grid("scheme", [f"{d}L-{d}L" for d in depths], rows)


def plot(results: Sequence[Dict[str, object]], schemes: Sequence[str], path: Path) -> Path:
    """BLEU vs depth, one line per scheme (a diverged run at 0); returns the JSON of the plotted series."""
    series = tuple(
        Series(scheme, tuple(sorted((r["layers"], 0.0 if r["diverged"] else r["bleu"]) for r in results
                                    if r["scheme"] == scheme)))
        for scheme in schemes)
    return plot_bleu_vs_depth([Panel("", series)], path, title="BLEU vs depth at toy scale (DeepNet Fig. 6 layout)",
                              xlabel="layers per side (N = M)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", nargs="+", choices=SCHEME_NAMES, default=list(DEFAULT_SCHEMES))
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEFAULT_DEPTHS), help="layers per side")
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--dim", type=int, default=64, help="model width (FFN = 4x)")
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--data", type=Path, help="binarized data from scripts/demo.sh (default: prepare the "
                        "bundled Tatoeba de-en under --out); needs ../text/test.en beside it for BLEU")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--dry-run", action="store_true", help="print the training commands and stop")
    args = parser.parse_args(argv)
    require_positive(parser, args, ("updates", "dim", "warmup", "max_tokens", "jobs", "threads", "depths"))
    grid = [(s, d) for s in args.schemes for d in args.depths]
    if args.dry_run:
        for scheme, layers in grid:
            print(" ".join(train_command(Path("DATA"), args.out / f"{scheme}_{layers}L", scheme, layers, args)))
        return 0

    data = data_or_bundled(parser, args.data, args.out)
    reference = data.parent / "text" / "test.en"
    if not reference.exists():
        parser.error(f"--data {data}: expected the raw test references at {reference}")
    print(f"sweep: {len(grid)} runs ({', '.join(args.schemes)} x {args.depths} layers, {args.updates} updates), "
          f"{args.jobs} at a time; logs under {args.out}", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda cell_: run_one(data, reference, args.out, *cell_, args), grid))
    markdown = table(results, args.schemes, args.depths)
    (args.out / "table.md").write_text(markdown + "\n")
    columns = ["scheme", "layers", "updates", "diverged", "final_valid_loss", "bleu", "exit_code", "seconds"]
    (args.out / "results.csv").write_text(csv_text(columns, ([r[c] for c in columns] for r in results)))
    plot(results, args.schemes, args.out / "bleu_vs_depth.png")
    print(markdown)
    print(f"wrote {args.out / 'table.md'}, results.csv and bleu_vs_depth.png (+ .json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
