"""Reliability: divergence reported clearly, crash-safe checkpoints, distributed equivalence, bad input."""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deepnet_fairseq  # noqa: F401
from conftest import USER_DIR, cli, run, train_args
from deepnet_fairseq.checkpoints import load_checkpoint
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


@pytest.fixture
def four_updates(tiny_data, tmp_path):
    """A run that trained 4 good updates; returns its save dir and checkpoint_last hash."""
    save = tmp_path / "run"
    run(train_args(tiny_data, save, "--deepnorm", "--max-update", "4"))
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


def test_atomic_copy_survives_sigkill_at_random_moments(tmp_path):
    old, new = os.urandom(4 << 20), os.urandom(4 << 20)
    (tmp_path / "a").write_bytes(old)
    (tmp_path / "b").write_bytes(new)
    dst = tmp_path / "checkpoint_last.pt"
    dst.write_bytes(old)
    script = (
        "import sys; from deepnet_fairseq.checkpoints import atomic_copy\n"
        "while True:\n"
        f"    atomic_copy({str(tmp_path / 'b')!r}, {str(dst)!r}); atomic_copy({str(tmp_path / 'a')!r}, {str(dst)!r})\n"
    )
    rng = random.Random(0)
    for _ in range(8):
        child = subprocess.Popen([sys.executable, "-c", script], cwd=Path(USER_DIR).parent)
        time.sleep(1.0 + rng.random() * 0.5)  # import time ~1s, then copies every few ms
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert dst.read_bytes() in (old, new)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) <= 8  # a killed copy may leave its temporary file, never a partial dst


def test_sigkill_during_training_never_leaves_unloadable_checkpoint(tiny_data, tmp_path):
    rng = random.Random(1)
    kills = resumes = 0
    for trial in range(3):
        save = tmp_path / f"kill{trial}"
        args = train_args(tiny_data, save, "--deepnorm", "--max-update", "500", "--save-interval-updates", "1",
                          "--disable-validation")
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        deadline = time.time() + 120
        while not (save / "checkpoint_last.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.random() * 2.0)  # then a random moment: training or (every update) saving
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        last = save / "checkpoint_last.pt"
        if not last.exists():
            continue
        state = load_checkpoint(last)  # never truncated
        done = state["optimizer_history"][-1]["num_updates"]
        resumed = run(train_args(tiny_data, save, "--deepnorm", "--max-update", str(done + 2), "--disable-validation"))
        assert f"Loaded checkpoint {last}" in resumed.stdout + resumed.stderr
        assert load_checkpoint(last)["optimizer_history"][-1]["num_updates"] == done + 2
        resumes += 1
    print(f"\nkills tried: {kills}, resumes succeeded: {resumes}")
    assert resumes >= 1


def test_corrupt_checkpoint_is_refused_naming_the_file(four_updates, tiny_data, tmp_path):
    save, _ = four_updates
    bad = tmp_path / "truncated.pt"
    data = (save / "checkpoint_last.pt").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    gen = run([cli("fairseq-generate"), tiny_data, "--user-dir", USER_DIR, "--path", bad, "--cpu"], check=False)
    assert gen.returncode != 0
    assert f"checkpoint {bad} cannot be read" in gen.stderr and "truncated or corrupt" in gen.stderr
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    shutil.copy(bad, resume_dir / "checkpoint_last.pt")
    proc = run(train_args(tiny_data, resume_dir, "--deepnorm", "--max-update", "6"), check=False)
    assert proc.returncode != 0
    assert f"checkpoint {resume_dir / 'checkpoint_last.pt'} cannot be read" in proc.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_process_run(tiny_data, save, max_update):
    port = _free_port()
    procs = []
    for rank in (0, 1):
        args = train_args(tiny_data, save, "--deepnorm", "--max-update", str(max_update), "--dropout", "0",
                          "--distributed-world-size", "2", "--distributed-rank", str(rank),
                          "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
                          "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp", "--device-id", "0")
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS="1")))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outputs


def _max_param_diff(a: Path, b: Path) -> float:
    pa, pb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert pa.keys() == pb.keys()
    return max((pa[k].double() - pb[k].double()).abs().max().item() for k in pa)


def test_two_gloo_processes_equal_one_process_with_update_freq_2_and_resume(tiny_data, tmp_path):
    single = tmp_path / "single"
    run(train_args(tiny_data, single, "--deepnorm", "--max-update", "4", "--dropout", "0", "--update-freq", "2"))
    dist = tmp_path / "dist"
    _two_process_run(tiny_data, dist, 4)
    diff = _max_param_diff(single / "checkpoint_last.pt", dist / "checkpoint_last.pt")
    assert diff < 1e-5, diff
    resumed = tmp_path / "dist_resumed"
    _two_process_run(tiny_data, resumed, 2)
    (out0, err0), _ = _two_process_run(tiny_data, resumed, 4)
    assert "Loaded checkpoint" in out0 + err0
    assert _max_param_diff(dist / "checkpoint_last.pt", resumed / "checkpoint_last.pt") < 1e-5


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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
    run([cli("fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt", "--trainpref", tmp_path / "train",
         "--validpref", tmp_path / "valid", "--testpref", tmp_path / "test", "--destdir", tmp_path / "bin",
         "--joined-dictionary", "--workers", "1"])
    proc = run([cli("fairseq-generate"), tmp_path / "bin", "--user-dir", USER_DIR, "--path",
                save / "checkpoint_last.pt", "--cpu"], check=False)
    assert proc.returncode != 0
    assert "the checkpoint's source dictionary has" in proc.stderr and "dict.*.txt" in proc.stderr
