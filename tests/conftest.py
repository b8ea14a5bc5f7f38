"""Shared fixtures: tiny generated parallel data, binarized once per session, and CLI helpers.

Every fairseq command line can run as a real console-script subprocess (:func:`run`) or in this process
(:func:`fairseq_main`, the same ``cli_main`` without ~5 s of CPU for importing torch and fairseq again).
The suite runs its in-process torch on one thread, like the subprocesses (``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import random
import resource
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import fairseq  # noqa: F401  (first, as under fairseq's CLIs: importing deepnet_fairseq then registers it)
import pytest
from hypothesis import HealthCheck, settings

# no property-based test may fail because the machine is slow: no per-example deadline, and no health
# check on how long generating examples takes (a test's own @settings must repeat the latter if it lists
# suppress_health_check)
settings.register_profile("deepnet", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("deepnet")

# before anything imports torch: one OpenMP/MKL thread per process (tests are tiny; spinning threads on a
# busy machine only burn CPU)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
USER_DIR = str(REPO / "deepnet_fairseq")
BIN = Path(sys.executable).parent


def _cpu_seconds() -> float:
    """user+sys CPU seconds of this process plus its finished (waited-for) children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With DEEPNET_TEST_CPU_LOG=<file>, append "<cpu seconds>\t<test id>" per test to that file.

    The span is setup + call + teardown, so a module or session fixture's cost lands on the first test
    that uses it (and a module fixture's teardown on the last).
    """
    log = os.environ.get("DEEPNET_TEST_CPU_LOG")
    start = _cpu_seconds() if log else 0.0
    yield
    if log:
        with open(log, "a") as handle:
            handle.write(f"{_cpu_seconds() - start:.2f}\t{item.nodeid}\n")


def cli(name: str) -> str:
    """Path of a console script installed in the same environment as this interpreter."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not installed next to {sys.executable}")
    return str(path)


def run(args: Sequence[str], cwd=None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command to completion (no time limit: a slow machine must not fail a test), output captured."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@contextlib.contextmanager
def captured_logs() -> Iterator[List[str]]:
    """Collect ``"<logger name> | <message>"`` of every INFO-or-above log record while inside.

    The lines look like a fairseq CLI's own log lines (fairseq renames its progress logger to the tag,
    ``train_inner``/``valid``), so :func:`logged_updates` parses them too.
    """
    lines: List[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.name} | {record.getMessage()}")

    handler, root = Collect(logging.INFO), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def fairseq_main(command: str, argv: Sequence[object], check: bool = True) -> Tuple[int, str]:
    """Run ``fairseq-<command>`` (``train``, ``generate``, ``preprocess``) in this process.

    Calls ``fairseq_cli.<command>.cli_main`` with ``sys.argv`` set to ``argv``; returns (exit code, log
    lines). A non-zero ``sys.exit`` fails the test when ``check``; exceptions propagate, so a refused input
    is asserted with ``pytest.raises``.
    """
    module = importlib.import_module(f"fairseq_cli.{command}")
    if command == "train":
        # fairseq keeps the best validation score of a process in function attributes; a fresh process
        # starts without them, so must every in-process run (else --keep-best-checkpoints and --patience
        # compare against another run's score)
        from fairseq import checkpoint_utils

        for holder, name in ((checkpoint_utils.save_checkpoint, "best"), (module.should_stop_early, "best"),
                             (module.should_stop_early, "num_runs")):
            if hasattr(holder, name):
                delattr(holder, name)
    saved = sys.argv
    sys.argv = [f"fairseq-{command}", *map(str, argv)]
    code = 0
    try:
        with captured_logs() as lines:
            try:
                module.cli_main()
            except SystemExit as exit_:
                code = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    log = "\n".join(lines)
    if check and code != 0:
        raise AssertionError(f"fairseq-{command} exited with {code}:\n{log[-5000:]}")
    return code, log


def generate_in_process(argv: Sequence[object], results: Path) -> str:
    """``fairseq-generate argv`` in this process; returns what it prints (S-/H- lines, BLEU) via --results-path."""
    fairseq_main("generate", [*argv, "--results-path", results])
    (output,) = results.glob("generate-*.txt")
    return output.read_text()


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
    fairseq_main("preprocess", ["--source-lang", "src", "--target-lang", "tgt", "--trainpref", root / "train",
                                "--validpref", root / "valid", "--testpref", root / "test", "--destdir", root / "bin",
                                "--joined-dictionary", "--workers", "1"])
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


def causes(err: BaseException) -> str:
    """The messages of an exception and of everything it was raised from (fairseq re-raises)."""
    messages = []
    while err is not None:
        messages.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    return "\n".join(messages)
