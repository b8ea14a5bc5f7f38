"""Reliability: divergence reported clearly, crash-safe checkpoints, distributed equivalence, bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deepnet_fairseq  # noqa: F401
from conftest import USER_DIR, fairseq_main, run, train_args
from deepnet_fairseq.checkpoints import CheckpointLoadError, load_checkpoint
from deepnet_fairseq.divergence import DIVERGED_EXIT_CODE, DivergenceGuard
from deepnet_fairseq.schemes import SCHEME_NAMES, DeepNetConfigError
from modelkit import build, sample_batch

pytestmark = pytest.mark.xdist_group("test_reliability")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_in_process(argv, monkeypatch):
    """Run fairseq-train's cli_main in this process; returns the SystemExit code (0 if none)."""
    from fairseq_cli import train

    monkeypatch.setattr(sys, "argv", ["fairseq-train", *map(str, argv)])
    try:
        train.cli_main()
    except SystemExit as exit_:
        return exit_.code
    return 0


def inject_nan_after(monkeypatch, training_forwards: int):
    """Make the first encoder layer output NaN after ``training_forwards`` training forwards."""
    from deepnet_fairseq.models.deepnet_transformer import DeepNetTransformerModel

    original = DeepNetTransformerModel.build_model.__func__
    seen = {"n": 0}

    def hook(module, args, output):
        if module.training:
            seen["n"] += 1
            if seen["n"] > training_forwards:
                return output * float("nan")
        return None

    def build_model(cls, args, task):
        model = original(cls, args, task)
        model.encoder.layers[0].register_forward_hook(hook)
        return model

    monkeypatch.setattr(DeepNetTransformerModel, "build_model", classmethod(build_model))


@pytest.fixture(scope="module")
def four_updates_once(tiny_data, tmp_path_factory):
    """One run of 4 good updates per module (trained in this process)."""
    save = tmp_path_factory.mktemp("four_updates") / "run"
    fairseq_main("train", train_args(tiny_data, save, "--deepnorm", "--max-update", "4")[1:])
    return save


@pytest.fixture
def four_updates(four_updates_once, tmp_path):
    """A fresh copy of a run that trained 4 good updates; returns its save dir and checkpoint_last hash."""
    save = tmp_path / "run"
    shutil.copytree(four_updates_once, save)
    return save, sha256(save / "checkpoint_last.pt")


def _argv(tiny_data, save, *extra):
    return train_args(tiny_data, save, "--deepnorm", "--max-update", "10", *extra)[1:]


def test_divergence_with_patience_exits_with_code_and_keeps_last_checkpoint(tiny_data, four_updates, monkeypatch,
                                                                           caplog):
    save, before = four_updates
    inject_nan_after(monkeypatch, 0)
    code = train_in_process(_argv(tiny_data, save, "--stop-on-divergence-patience", "1"), monkeypatch)
    assert code == DIVERGED_EXIT_CODE
    messages = [r.getMessage() for r in caplog.records if "Training diverged" in r.getMessage()]
    assert len(messages) == 1
    assert "update 5" in messages[0] and "deepnorm(" in messages[0] and "2L-2L" in messages[0]
    assert "lr 0.001" in messages[0] and str(save / "checkpoint_last.pt") in messages[0]
    assert sha256(save / "checkpoint_last.pt") == before
    assert load_checkpoint(save / "checkpoint_last.pt")["optimizer_history"][-1]["num_updates"] == 4


def test_divergence_without_patience_reports_then_raises(tiny_data, four_updates, monkeypatch, caplog):
    save, before = four_updates
    inject_nan_after(monkeypatch, 0)
    with pytest.raises(FloatingPointError):
        train_in_process(_argv(tiny_data, save), monkeypatch)
    assert any("Training diverged at update 5" in r.getMessage() for r in caplog.records)
    assert sha256(save / "checkpoint_last.pt") == before


class _FakeTrainer:
    def __init__(self, save_dir):
        from argparse import Namespace

        from deepnet_fairseq.schemes import build_scheme
        from deepnet_fairseq.schemes.base import SchemeContext

        decoder = torch.nn.Module()
        decoder.layers = [object()] * 3
        decoder.scheme = build_scheme("post-ln", SchemeContext("decoder", 0, 3))
        self.model = torch.nn.Module()
        self.model.decoder = decoder
        self.cfg = Namespace(model=Namespace(stop_on_divergence_patience=3), checkpoint=Namespace(save_dir=save_dir))

    def get_model(self):
        return self.model

    def get_num_updates(self):
        return 41

    def get_lr(self):
        return 5e-4


def test_patience_counts_consecutive_skipped_or_nonfinite_updates(tmp_path):
    guard = DivergenceGuard(_FakeTrainer(str(tmp_path)))
    trainer = _FakeTrainer(str(tmp_path))
    guard.observe(trainer, None)  # fp16 overflow: update skipped
    guard.observe(trainer, {"loss": float("nan")})
    guard.observe(trainer, {"loss": 2.0})  # a good update resets the count
    guard.observe(trainer, None)
    guard.observe(trainer, {"loss": float("inf")})
    with pytest.raises(SystemExit) as exit_:
        guard.observe(trainer, None)
    assert exit_.value.code == DIVERGED_EXIT_CODE


BLOCK = 256 << 10


def _announce(fd: int, message: str) -> None:
    os.write(fd, (message + "\n").encode())


def _copy_in_blocks_pausing_at(pause_at: int, fd: int):
    """A ``shutil.copyfileobj`` writing ``BLOCK`` bytes at a time that, before block ``pause_at``, says
    ``paused`` on ``fd`` and waits for SIGKILL."""

    def copyfileobj(inp, out, length=0):
        written = 0
        while True:
            if written == pause_at:
                _announce(fd, "paused")
                signal.pause()
            block = inp.read(BLOCK)
            if not block:
                return
            out.write(block)
            written += 1

    return copyfileobj


def _forked(child) -> tuple:
    """Fork; the child runs ``child(fd)`` (``fd``: the write end of a pipe) and exits.

    Returns (pid, the read end as a text file). The children only copy files, so forking this process
    spares each one a fresh interpreter importing torch and fairseq.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            child(write_fd)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_fd)
    return pid, os.fdopen(read_fd)


def _read_then_sigkill(pid: int, messages, count: int) -> list:
    """Read ``count`` lines from a forked child, then SIGKILL it (also if reading fails) and reap it."""
    try:
        return [messages.readline() for _ in range(count)]
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        messages.close()


def _temporaries(directory: Path) -> set:
    return {p.name for p in directory.iterdir() if p.name.endswith(".tmp")}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_give_files_the_usual_permissions(tmp_path, umask):
    """checkpoint_last.pt (atomic_copy), deepnet-average-checkpoints and deepnet-export (atomic_write) get
    0666 less the umask, as checkpoint_best.pt written by torch.save does; not mkstemp's owner-only 0600."""
    from deepnet_fairseq.checkpoints import atomic_copy, atomic_write

    (tmp_path / "src").write_bytes(b"weights")
    old = os.umask(umask)
    try:
        atomic_copy(tmp_path / "src", tmp_path / "copied")
        atomic_write(tmp_path / "written", lambda out: out.write(b"weights"))
        (tmp_path / "plain").write_bytes(b"weights")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("copied", "written", "plain")} == {
        "copied": expected, "written": expected, "plain": expected}


def test_atomic_copy_survives_sigkill_at_random_moments(tmp_path):
    """SIGKILL an ``atomic_copy`` child relative to its own signals, never after a guessed sleep.

    Paused kills: the child stops before block k of 16 (k = 0: empty temporary file; k = 16: every byte
    written, not yet flushed or renamed) and says so; each such kill lands mid-copy by construction.
    Running kills: the child copies b, a, b, ... over dst with the unmodified atomic_copy, reporting each
    finished copy; after a random number of reports it is killed wherever it is (mid-copy when a
    temporary file is left behind).
    Either way dst must be the complete old or the complete new file, never a mix or a prefix.
    """
    from deepnet_fairseq.checkpoints import atomic_copy

    old, new = os.urandom(16 * BLOCK), os.urandom(16 * BLOCK)
    (tmp_path / "a").write_bytes(old)
    (tmp_path / "b").write_bytes(new)
    dst = tmp_path / "checkpoint_last.pt"
    dst.write_bytes(old)
    rng = random.Random(0)
    kills = mid_copy = 0

    for pause_at in [0, 16, *rng.sample(range(1, 16), 3)]:
        def child(fd, pause_at=pause_at):
            shutil.copyfileobj = _copy_in_blocks_pausing_at(pause_at, fd)
            atomic_copy(tmp_path / "b", dst)

        before = _temporaries(tmp_path)
        assert _read_then_sigkill(*_forked(child), 1) == ["paused\n"]
        kills += 1
        assert dst.read_bytes() == old, pause_at  # killed before the rename: the old file, whole
        assert len(_temporaries(tmp_path) - before) == 1, pause_at  # the interrupted copy's temporary file
        mid_copy += 1

    for _ in range(4):
        def child(fd):
            while True:
                for source in ("b", "a"):
                    atomic_copy(tmp_path / source, dst)
                    _announce(fd, source)

        before = _temporaries(tmp_path)
        reports = _read_then_sigkill(*_forked(child), rng.randint(1, 6))
        assert set(reports) <= {"a\n", "b\n"}, reports
        kills += 1
        assert dst.read_bytes() in (old, new)
        mid_copy += bool(_temporaries(tmp_path) - before)

    print(f"\nkills: {kills}, landed mid-copy: {mid_copy}")
    assert mid_copy >= 5
    assert len(_temporaries(tmp_path)) <= kills  # a killed copy may leave its temporary file, never a partial dst


# fairseq-train in a child that reports each PathManager.copy (fairseq's copy of checkpoint_N_U.pt to
# checkpoint_last.pt, made crash-safe by the plugin) on stdout as "@@ copy-begin <n>", n counting the
# copies to checkpoint_last.pt; with argv[1] = "pause", before block argv[3] of copy argv[2] it reports
# "@@ paused" and waits for SIGKILL. argv[4:] is the fairseq-train command line.
TRAIN_CHILD = r"""
import os, signal, shutil, sys
import deepnet_fairseq
deepnet_fairseq.register()  # installs the crash-safe PathManager.copy, registers the models
from fairseq.file_io import PathManager
from fairseq_cli import train

mode, pause_copy, pause_block = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
safe_copy, state = PathManager.copy, {"copies": 0, "last": False}

def say(message):
    print("@@ " + message, flush=True)

def copy(src, dst, overwrite=False):
    state["last"] = dst.endswith("checkpoint_last.pt")
    state["copies"] += state["last"]
    if state["last"]:
        say(f"copy-begin {state['copies']}")
    return safe_copy(src, dst, overwrite=overwrite)

def copyfileobj(inp, out, length=0):
    block, written = max(os.fstat(inp.fileno()).st_size // 8, 1), 0
    while True:
        if mode == "pause" and state["last"] and state["copies"] == pause_copy and written == pause_block:
            say("paused")
            signal.pause()
        data = inp.read(block)
        if not data:
            return
        out.write(data)
        written += 1

copy._deepnet_safe = True
PathManager.copy = staticmethod(copy)
shutil.copyfileobj = copyfileobj
sys.argv = ["fairseq-train", *sys.argv[4:]]
train.cli_main()
"""


def _train_until(args, mode: str, copy_index: int, block: int, trigger: str) -> str:
    """Start TRAIN_CHILD, read its output up to the line starting with ``trigger``, SIGKILL it there.

    Returns the output read. Fails (instead of waiting forever) if the child exits without the trigger.
    """
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_CHILD, mode, str(copy_index), str(block), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    seen, triggered = [], False
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(trigger):
                triggered = True
                break
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    output = "".join(seen)
    assert triggered, f"the child exited ({proc.returncode}) before {trigger!r}:\n{output[-3000:]}"
    return output


def test_sigkill_during_training_never_leaves_unloadable_checkpoint(tiny_data, tmp_path):
    """SIGKILL fairseq-train relative to its own "copying checkpoint_last.pt" signal, then resume.

    1. a fresh run paused inside its copy number k to checkpoint_last.pt (mid-copy by construction):
       checkpoint_last.pt must be the whole previous one (update k - 1) and the copy's temporary file
       must be there;
    2. that run resumed (it must load checkpoint_last.pt) and killed as soon as it reports starting a
       copy: checkpoint_last.pt must load, at the update before or of that copy;
    3. a last resume (in this process) trains 2 more updates from whatever was left.
    """
    rng = random.Random(1)
    save = tmp_path / "kill"
    last = save / "checkpoint_last.pt"
    args = train_args(tiny_data, save, "--deepnorm", "--max-update", "8", "--save-interval-updates", "1",
                      "--disable-validation")[1:]

    copy_index, block = rng.randint(2, 4), rng.randint(0, 8)
    _train_until(args, "pause", copy_index, block, "@@ paused")
    assert load_checkpoint(last)["optimizer_history"][-1]["num_updates"] == copy_index - 1
    assert [p.name for p in save.glob("checkpoint_last.pt.*.tmp")], "the kill did not land mid-copy"

    again = rng.randint(1, 3)
    output = _train_until(args, "free", 0, 0, f"@@ copy-begin {again}")
    assert f"Loaded checkpoint {last}" in output
    done = load_checkpoint(last)["optimizer_history"][-1]["num_updates"]  # never truncated
    assert done in (copy_index - 1 + again - 1, copy_index - 1 + again), done

    resume = train_args(tiny_data, save, "--deepnorm", "--max-update", str(done + 2), "--disable-validation")[1:]
    _, log = fairseq_main("train", resume)
    assert f"Loaded checkpoint {last}" in log
    assert load_checkpoint(last)["optimizer_history"][-1]["num_updates"] == done + 2


def test_corrupt_checkpoint_is_refused_naming_the_file(four_updates, tiny_data, tmp_path):
    """fairseq-generate and a fairseq-train resume (both in this process) refuse a truncated checkpoint."""
    save, _ = four_updates
    bad = tmp_path / "truncated.pt"
    data = (save / "checkpoint_last.pt").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointLoadError) as refused:
        fairseq_main("generate", [tiny_data, "--user-dir", USER_DIR, "--path", bad, "--cpu"])
    assert f"checkpoint {bad} cannot be read" in str(refused.value) and "truncated or corrupt" in str(refused.value)
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    shutil.copy(bad, resume_dir / "checkpoint_last.pt")
    with pytest.raises(CheckpointLoadError, match=f"checkpoint {resume_dir / 'checkpoint_last.pt'} cannot be read"):
        fairseq_main("train", train_args(tiny_data, resume_dir, "--deepnorm", "--max-update", "6")[1:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Runs fairseq-train's cli_main as two gloo ranks per run, for each run of argv[1] (JSON: a list of runs,
# each a list of [argv, log file] per rank), one run after the other. fairseq and the plugin are imported
# once, before any torch computation or thread exists; each rank is a fork of this process with its output
# in its log file. A rank that fails takes the other one down at once (it would wait for it in gloo).
GLOO_LAUNCHER = r"""
import json, os, signal, sys, traceback
import deepnet_fairseq
from fairseq_cli import train

deepnet_fairseq.register()  # --user-dir skips a package imported before fairseq

for ranks in json.loads(sys.argv[1]):
    pids = []
    for argv, log in ranks:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.argv = ["fairseq-train", *argv]
                train.cli_main()
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    codes = {}
    while len(codes) < len(pids):
        pid, status = os.wait()
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] != 0:
            for other in set(pids) - set(codes):
                os.kill(other, signal.SIGKILL)
    if any(codes.values()):
        sys.exit(f"ranks exited with {[codes[pid] for pid in pids]}: see {[log for _, log in ranks]}")
"""


def _two_process_runs(tiny_data, runs) -> list:
    """Each (save dir, max update) of ``runs`` trained by two gloo fairseq-train processes, in order.

    Returns the log text of each run's rank 0.
    """
    plan = []
    for index, (save, max_update) in enumerate(runs):
        port = _free_port()
        ranks = []
        for rank in (0, 1):
            args = train_args(tiny_data, save, "--deepnorm", "--max-update", str(max_update), "--dropout", "0",
                              "--distributed-world-size", "2", "--distributed-rank", str(rank),
                              "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
                              "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp", "--device-id", "0")
            ranks.append([args[1:], str(save.parent / f"run{index}-rank{rank}.log")])
        plan.append(ranks)
    proc = run([sys.executable, "-c", GLOO_LAUNCHER, json.dumps(plan, default=str)], check=False)
    logs = [[Path(log).read_text() if Path(log).exists() else "" for _, log in ranks] for ranks in plan]
    assert proc.returncode == 0, f"{proc.stderr[-2000:]}\n" + "\n".join(text[-3000:] for run_ in logs for text in run_)
    return [rank_logs[0] for rank_logs in logs]


def _max_param_diff(a: Path, b: Path) -> float:
    pa, pb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert pa.keys() == pb.keys()
    return max((pa[k].double() - pb[k].double()).abs().max().item() for k in pa)


def test_two_gloo_processes_equal_one_process_with_update_freq_2_and_resume(tiny_data, tmp_path):
    single = tmp_path / "single"  # in this process; the ranks are real fairseq-train processes
    fairseq_main("train", train_args(tiny_data, single, "--deepnorm", "--max-update", "4", "--dropout", "0",
                                     "--update-freq", "2")[1:])
    dist, resumed = tmp_path / "dist", tmp_path / "dist_resumed"
    *_, resumed_log = _two_process_runs(tiny_data, [(dist, 4), (resumed, 2), (resumed, 4)])
    diff = _max_param_diff(single / "checkpoint_last.pt", dist / "checkpoint_last.pt")
    assert diff < 1e-5, diff
    assert "Loaded checkpoint" in resumed_log
    assert _max_param_diff(dist / "checkpoint_last.pt", resumed / "checkpoint_last.pt") < 1e-5


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    layers=st.integers(min_value=-1, max_value=3),
    width=st.sampled_from([0, 6, 8, 12, 16]),
    heads=st.integers(min_value=0, max_value=4),
    scheme=st.sampled_from(SCHEME_NAMES),
)
def test_fuzz_model_construction(tiny_data, layers, width, heads, scheme):
    flags = ["--residual-scheme", scheme, "--encoder-layers", layers, "--decoder-layers", max(layers, 1),
             "--encoder-embed-dim", width, "--decoder-embed-dim", width, "--encoder-ffn-embed-dim", 2 * width,
             "--decoder-ffn-embed-dim", 2 * width, "--encoder-attention-heads", heads,
             "--decoder-attention-heads", heads, "--share-all-embeddings"]
    try:
        model, task = build(tiny_data, *flags)
    except DeepNetConfigError as err:
        assert str(err).startswith("--")  # names the flag
        return
    src, lengths, prev = sample_batch(task)
    with torch.no_grad():
        out, _ = model(src, lengths, prev)
    assert torch.isfinite(out).all()
    assert layers >= 1 and width >= 1 and heads >= 1 and width % heads == 0 and math.isfinite(out.sum().item())


def test_generation_with_another_dictionary_is_refused_naming_the_cause(four_updates, tiny_data, tmp_path):
    save, _ = four_updates
    for split in ("train", "valid", "test"):
        for lang in ("src", "tgt"):
            text = (tiny_data.parent / f"{split}.{lang}").read_text()
            (tmp_path / f"{split}.{lang}").write_text(text + "".join(f"x{i} y{i} z{i}\n" for i in range(30)))
    fairseq_main("preprocess", ["--source-lang", "src", "--target-lang", "tgt", "--trainpref", tmp_path / "train",
                                "--validpref", tmp_path / "valid", "--testpref", tmp_path / "test",
                                "--destdir", tmp_path / "bin", "--joined-dictionary", "--workers", "1"])
    with pytest.raises(DeepNetConfigError) as refused:
        fairseq_main("generate", [tmp_path / "bin", "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt",
                                  "--cpu"])
    assert "the checkpoint's source dictionary has" in str(refused.value) and "dict.*.txt" in str(refused.value)
