#!/usr/bin/env python3
"""Summarize a demo run: loss curves (PNG), summary.json, and a few example translations.

Reads, for each model NAME under --out: NAME/train.log (fairseq-train with ``--log-format json``),
NAME/wall_seconds, NAME/exit_code, NAME/bleu.json and NAME/test.hyp.* (from scripts/score_bleu.py).
Writes OUT/loss.png and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

LABELS = {"deepnorm": "DeepNorm", "postln": "Post-LN"}
PARAMS_RE = re.compile(r"num\. (?:shared )?model params: ([\d,]+)")


def _json_record(line: str, tag: str) -> Optional[dict]:
    """The json payload of a fairseq log line ``... | <tag> | {...}``, else None."""
    marker = f"| {tag} | "
    at = line.find(marker)
    if at < 0:
        return None
    try:
        return json.loads(line[at + len(marker):])
    except json.JSONDecodeError:
        return None


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def parse_train_log(path: Path) -> dict:
    train: List[tuple] = []
    valid: List[tuple] = []
    params = None
    stop_reason = None
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            record = _json_record(line, "train_inner")
            if record is not None:
                train.append((int(record["num_updates"]), _number(record["loss"])))
                continue
            record = _json_record(line, "valid")
            if record is not None and "valid_loss" in record:
                valid.append((int(record["valid_num_updates"]), _number(record["valid_loss"])))
                continue
            match = PARAMS_RE.search(line)
            if match and params is None:
                params = int(match.group(1).replace(",", ""))
            if "Stopping training due to" in line or "FloatingPointError" in line:
                stop_reason = line.strip().split(" | ")[-1]
    return {"train": train, "valid": valid, "params": params, "stop_reason": stop_reason}


def is_diverged(train: List[tuple], valid: List[tuple], exit_code: int) -> bool:
    losses = [loss for _, loss in train] + [loss for _, loss in valid]
    if any(not math.isfinite(loss) for loss in losses):
        return True
    if exit_code != 0:
        return True
    # Training made things worse overall: last logged train loss above the first one.
    return bool(train) and train[-1][1] > train[0][1]


def _read(path: Path, default=None):
    return path.read_text(encoding="utf-8").strip() if path.exists() else default


def model_summary(out: Path, name: str) -> dict:
    run = out / name
    log = parse_train_log(run / "train.log")
    exit_code = int(_read(run / "exit_code", "0"))
    bleu = json.loads(_read(run / "bleu.json", "null") or "null")
    train, valid = log["train"], log["valid"]
    return {
        "label": LABELS.get(name, name),
        "bleu": bleu["bleu"] if bleu else None,
        "bleu_signature": bleu["signature"] if bleu else None,
        "bleu_line": bleu["score_line"] if bleu else None,
        "parameters": log["params"],
        "updates": max([u for u, _ in train] + [u for u, _ in valid] + [0]),
        "wall_seconds": _number(_read(run / "wall_seconds")),
        "initial_train_loss": train[0][1] if train else None,
        "final_train_loss": train[-1][1] if train else None,
        "final_valid_loss": valid[-1][1] if valid else None,
        "best_valid_loss": min(loss for _, loss in valid) if valid else None,
        "diverged": is_diverged(train, valid, exit_code),
        "exit_code": exit_code,
        "stop_reason": log["stop_reason"],
        "train_curve": train,
        "valid_curve": valid,
    }


def plot(models: Dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"deepnorm": "tab:blue", "postln": "tab:red"}
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for name, info in models.items():
        color = colors.get(name)
        if info["train_curve"]:
            u, loss = zip(*info["train_curve"], strict=True)
            ax.plot(u, loss, color=color, alpha=0.55, linewidth=1.2, label=f"{info['label']} train")
        if info["valid_curve"]:
            u, loss = zip(*info["valid_curve"], strict=True)
            ax.plot(u, loss, color=color, marker="o", markersize=4, linewidth=2, label=f"{info['label']} valid")
    ax.set_xlabel("update")
    ax.set_ylabel("loss (label-smoothed cross-entropy, base 2)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(value, spec=".2f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _clip(text: str, width: int = 150) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="the demo's output directory")
    parser.add_argument("--models", nargs="+", default=["deepnorm", "postln"])
    parser.add_argument("--layers", type=int, required=True, help="encoder layers (= decoder layers)")
    parser.add_argument("--updates", type=int, required=True, help="requested updates per model")
    parser.add_argument("--source", type=Path, required=True, help="raw test source text")
    parser.add_argument("--reference", type=Path, required=True, help="raw test reference text")
    parser.add_argument("--total-seconds", type=float, default=None, help="wall time of the whole demo so far")
    parser.add_argument("--corpus", default="De->En Tatoeba", help="what the models translate, for the plot title")
    parser.add_argument("--examples", type=int, default=5)
    args = parser.parse_args(argv)

    models = {name: model_summary(args.out, name) for name in args.models}
    title = (f"{args.corpus}, {args.layers}L-{args.layers}L encoder-decoder, same settings; "
             + ", ".join(f"{m['label']} BLEU {_fmt(m['bleu'], '.1f')}" for m in models.values()))
    plot_path = args.out / "loss.png"
    plot(models, plot_path, title)

    train_args_file = args.out / "train_args.txt"
    split_file = args.out / "data" / "text" / "split.json"
    summary = {
        "encoder_layers": args.layers,
        "decoder_layers": args.layers,
        "depth": 2 * args.layers,
        "requested_updates": args.updates,
        "total_wall_seconds": args.total_seconds,
        "models": {name: {k: v for k, v in info.items() if not k.endswith("_curve")} for name, info in models.items()},
        "curves": {name: {"train": info["train_curve"], "valid": info["valid_curve"]} for name, info in models.items()},
        "data": json.loads(split_file.read_text()) if split_file.exists() else None,
        "train_args": train_args_file.read_text().splitlines() if train_args_file.exists() else None,
        "plot": str(plot_path),
    }
    finals = {name: info["final_valid_loss"] for name, info in models.items()}
    gap = None
    if finals.get("deepnorm") is not None and finals.get("postln") is not None:
        gap = finals["postln"] - finals["deepnorm"]
        summary["valid_loss_gap"] = gap  # bits, like fairseq's losses
        summary["valid_loss_gap_nats"] = gap * math.log(2)
    summary_path = args.out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    print(f"{'model':<10} {'BLEU':>6} {'valid loss':>10} {'train loss':>14} {'updates':>8} {'params':>10} "
          f"{'wall s':>7}  diverged")
    for info in models.values():
        print(f"{info['label']:<10} {_fmt(info['bleu'], '.2f'):>6} {_fmt(info['final_valid_loss'], '.3f'):>10} "
              f"{_fmt(info['initial_train_loss'], '.2f'):>6}->{_fmt(info['final_train_loss'], '.2f'):<6} "
              f"{info['updates']:>8} {_fmt(info['parameters'], ','):>10} {_fmt(info['wall_seconds'], '.0f'):>7}  "
              f"{info['diverged']}")

    sources = args.source.read_text(encoding="utf-8").splitlines()
    references = args.reference.read_text(encoding="utf-8").splitlines()
    hyps = {}
    for name in args.models:
        found = sorted((args.out / name).glob("test.hyp.*"))
        hyps[name] = found[0].read_text(encoding="utf-8").splitlines() if found else []
    if gap is not None:
        print(f"valid loss gap at update {args.updates}: Post-LN - DeepNorm = {gap:.2f} bits "
              f"({gap * math.log(2):.2f} nats; fairseq's losses are base 2)")

    print(f"\nExample translations (first {args.examples} test sentences with distinct references):")
    seen, shown = set(), 0
    for i, (src, ref) in enumerate(zip(sources, references, strict=True)):
        if shown >= args.examples:
            break
        if ref in seen:
            continue
        seen.add(ref)
        shown += 1
        print(f"  source:    {src}\n  reference: {ref}")
        for name in args.models:
            if i < len(hyps[name]):
                print(f"  {LABELS.get(name, name) + ':':<10} {_clip(hyps[name][i])}")
        print()
    print("Test BLEU (sacreBLEU on the detokenized output against the raw references):")
    for info in models.values():
        if info["bleu_line"]:
            print(f"  {info['label'] + ':':<10} {info['bleu_line']}\n  {'':<10} signature: {info['bleu_signature']}")
    print(f"loss plot: {plot_path}")
    if args.total_seconds is not None:
        print(f"total wall time: {args.total_seconds:.0f} s")
    print(f"summary: {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
