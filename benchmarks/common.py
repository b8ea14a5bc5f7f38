"""Shared helpers: synthetic dictionaries, fairseq model building, fixed batches, one training step.

Everything goes through fairseq's own code paths: ``deepnet_fairseq.build`` (fairseq's training
parser, ``task.build_model``) for the model, ``task.build_criterion`` for the loss,
``fairseq.optim.build_optimizer`` for Adam, ``task.train_step`` for forward + backward and
``task.build_generator`` (``SequenceGenerator``) for beam search.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
USER_DIR = str(REPO / "deepnet_fairseq")


def single_thread() -> None:
    """Pin torch (and its OpenMP/MKL pools) to one thread, for stable timings on a shared machine."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def child_env() -> Dict[str, str]:
    """Environment for benchmark subprocesses: single-threaded, quiet, repository importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def write_dictionary(directory: Path, vocab: int) -> Path:
    """Write fairseq dictionaries ``dict.src.txt``/``dict.tgt.txt`` with ``vocab`` fake words (joint)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"w{i} {1000 - i % 1000}\n" for i in range(vocab))
    for lang in ("src", "tgt"):
        (directory / f"dict.{lang}.txt").write_text(lines)
    return directory


def command_line(data_dir: Path, arch: str, flags: Sequence[str]) -> List[str]:
    """The benchmarks' ``fairseq-train`` command line (translation, CPU, Adam, label smoothing) plus ``flags``."""
    return [
        str(data_dir), "--arch", arch, "--source-lang", "src", "--target-lang", "tgt", "--cpu",
        "--optimizer", "adam", "--lr", "1e-4", "--adam-betas", "(0.9, 0.98)",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        *map(str, flags),
    ]


def build(data_dir: Path, arch: str, flags: Sequence[str], seed: int = 1, meta: bool = False) -> Tuple[Any, ...]:
    """Build ``(args, task, model)`` exactly as ``fairseq-train`` does; on the meta device if ``meta``.

    Stock architectures (``transformer``) and this plugin's build through the same
    :func:`deepnet_fairseq.build.build_from_command_line`.
    """
    import torch

    from deepnet_fairseq.build import build_from_command_line

    with torch.device("meta") if meta else contextlib.nullcontext():
        model, task, args = build_from_command_line(command_line(data_dir, arch, flags), seed=seed)
    return args, task, model


def build_trainable(data_dir: Path, arch: str, flags: Sequence[str], seed: int = 1) -> Tuple[Any, ...]:
    """``(args, task, model, criterion, optimizer)`` with fairseq's criterion and fairseq's Adam."""
    from fairseq import optim

    args, task, model = build(data_dir, arch, flags, seed=seed)
    criterion = task.build_criterion(args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optim.build_optimizer(args, params)
    return args, task, model, criterion, optimizer


def fixed_batch(task: Any, sentences: int, src_len: int, tgt_len: int, seed: int = 0) -> Dict[str, Any]:
    """A fixed fairseq translation sample (no padding) of ``sentences`` x ``src_len``/``tgt_len`` tokens."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    first = src_dict.nspecial
    src = torch.randint(first, len(src_dict), (sentences, src_len), generator=gen)
    src[:, -1] = src_dict.eos()
    target = torch.randint(tgt_dict.nspecial, len(tgt_dict), (sentences, tgt_len), generator=gen)
    target[:, -1] = tgt_dict.eos()
    prev = torch.cat([torch.full((sentences, 1), tgt_dict.eos()), target[:, :-1]], dim=1)
    return {
        "id": torch.arange(sentences),
        "nsentences": sentences,
        "ntokens": sentences * tgt_len,
        "net_input": {
            "src_tokens": src,
            "src_lengths": torch.full((sentences,), src_len, dtype=torch.long),
            "prev_output_tokens": prev,
        },
        "target": target,
    }


def train_step(task: Any, model: Any, criterion: Any, optimizer: Any, sample: Dict[str, Any], update: int) -> float:
    """One full update: fairseq's ``task.train_step`` (forward + backward), then the Adam step.

    Returns the loss per target token in nats (fairseq's ``loss / sample_size``).
    """
    optimizer.zero_grad()
    loss, sample_size, _ = task.train_step(sample, model, criterion, optimizer, update)
    optimizer.step()
    return float(loss.detach()) / max(float(sample_size), 1.0)


def peak_rss_mib() -> float:
    """This process's own peak resident set size so far, MiB.

    On Linux this is ``VmHWM`` from ``/proc/self/status``, the high-water mark of the process's
    current address space.  ``getrusage(RUSAGE_SELF).ru_maxrss`` is *not* usable in a subprocess
    here: Linux carries the parent's high-water mark across ``fork``/``execve`` into the child's
    ``ru_maxrss`` (``exec_mmap`` folds the old mm's peak into ``signal->maxrss``), so a child started
    by a 6 GiB parent reports >= 6 GiB whatever it does.  Elsewhere ``ru_maxrss`` is the fallback.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return ru_maxrss_mib()


def ru_maxrss_mib() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in MiB (inherits the parent's peak on Linux, see above)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)


def timed(fn) -> float:
    """Wall-clock seconds of one call (``time.perf_counter``)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def quantiles(values: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles (inclusive method), min and max of a sample."""
    vals = sorted(float(v) for v in values)
    if len(vals) == 1:
        q1 = q3 = vals[0]
    else:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return {
        "median": statistics.median(vals),
        "q1": q1,
        "q3": q3,
        "min": vals[0],
        "max": vals[-1],
        "n": len(vals),
    }


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> Dict[str, float]:
    """Least-squares line ``y = slope * x + intercept`` and its coefficient of determination R^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx if sxx else 0.0
    intercept = my - slope * mx
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot else 1.0
    return {"slope": slope, "intercept": intercept, "r2": r2}


def all_finite(obj: Any) -> bool:
    """True if every float inside a JSON-like structure is finite."""
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


def environment() -> Dict[str, Any]:
    """Versions and machine facts recorded with every result file."""
    import fairseq
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fairseq": fairseq.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def write_json(path: Path, data: Dict[str, Any]) -> None:
    """Write ``data`` as indented JSON (refusing NaN/inf, which are not JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


@contextlib.contextmanager
def quiet_logging() -> Iterator[None]:
    """Silence fairseq's INFO logging (model summaries) while benchmarking."""
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


def log(message: str) -> None:
    """Progress line on stderr, flushed (benchmarks take minutes)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def flag_list(*groups: Optional[Sequence[str]]) -> List[str]:
    """Concatenate optional flag groups into one argv list."""
    return [str(f) for g in groups if g for f in g]
