"""Shared fixtures: tiny generated parallel data, binarized once per session, and CLI helpers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import pytest

REPO = Path(__file__).resolve().parent.parent
USER_DIR = str(REPO / "deepnet_fairseq")
BIN = Path(sys.executable).parent


def cli(name: str) -> str:
    """Path of a console script installed in the same environment as this interpreter."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not installed next to {sys.executable}")
    return str(path)


def run(args: Sequence[str], cwd=None, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def write_reversal_corpus(directory: Path, seed: int = 0) -> None:
    """A toy translation task (target = reversed source) over a 40-word vocabulary."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(40)]
    for split, n in (("train", 400), ("valid", 40), ("test", 20)):
        with open(directory / f"{split}.src", "w") as src, open(directory / f"{split}.tgt", "w") as tgt:
            for _ in range(n):
                sent = [rng.choice(words) for _ in range(rng.randint(3, 10))]
                src.write(" ".join(sent) + "\n")
                tgt.write(" ".join(reversed(sent)) + "\n")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Binarized toy parallel data with a joined dictionary."""
    root = tmp_path_factory.mktemp("tiny_data")
    write_reversal_corpus(root)
    run(
        [cli("fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt",
         "--trainpref", root / "train", "--validpref", root / "valid", "--testpref", root / "test",
         "--destdir", root / "bin", "--joined-dictionary", "--workers", "1"]
    )
    return root / "bin"


def train_args(data: Path, save_dir: Path, *extra: str, arch: str = "deepnet_transformer_tiny") -> List[str]:
    """A tiny CPU fairseq-train command line through the plugin."""
    return [
        cli("fairseq-train"), str(data), "--user-dir", USER_DIR, "--arch", arch,
        "--encoder-layers", "2", "--decoder-layers", "2",
        "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "500", "--cpu", "--seed", "1",
        "--no-progress-bar", "--log-format", "json", "--log-interval", "1",
        "--save-dir", str(save_dir), "--num-workers", "0", *extra,
    ]


def logged_updates(stdout: str) -> dict:
    """{num_updates: loss} from fairseq's json train_inner log lines."""
    losses = {}
    for line in stdout.splitlines():
        start = line.find("{")
        if "train_inner" not in line or start < 0:
            continue
        record = json.loads(line[start:])
        losses[int(record["num_updates"])] = float(record["loss"])
    return losses
