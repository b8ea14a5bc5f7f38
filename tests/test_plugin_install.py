"""Issue: installable plugin on today's stack; safe checkpoint loading on torch >= 2.6."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch

import deepnet_fairseq
from conftest import USER_DIR, cli, fairseq_main, generate_in_process, logged_updates, run, train_args
from deepnet_fairseq.checkpoints import (
    CHECKPOINT_GLOBALS,
    CheckpointLoadError,
    average_checkpoints,
    checkpoint_globals,
    load_checkpoint,
)
from deepnet_fairseq.cli.average_checkpoints import main as average_main
from deepnet_fairseq.fairseq_fixes import FIXES

deepnet_fairseq.register()  # deepnet_fairseq is imported before fairseq here: register explicitly

# module-scoped training fixtures: keep this file on one xdist worker
pytestmark = pytest.mark.xdist_group("test_plugin_install")


def _allowed_names() -> set:
    names = set()
    for entry in CHECKPOINT_GLOBALS:
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f"{entry.__module__}.{entry.__qualname__}")
    return names


@pytest.fixture(scope="module")
def resumed_and_straight(tiny_data, tmp_path_factory):
    """12 updates in one run vs 6 + resume for 6 more (same seed, dropout on).

    The straight run is the real ``fairseq-train --user-dir`` console script; the resumed pair runs the
    same ``cli_main`` in this process. Returns (root, straight output, first log, second log).
    """
    root = tmp_path_factory.mktemp("resume")
    extra = ("--dropout", "0.1", "--deepnorm", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4")
    straight = run(train_args(tiny_data, root / "straight", "--max-update", "12", *extra))
    _, first = fairseq_main("train", train_args(tiny_data, root / "resumed", "--max-update", "6", *extra)[1:])
    _, second = fairseq_main("train", train_args(tiny_data, root / "resumed", "--max-update", "12", *extra)[1:])
    return root, straight.stdout + straight.stderr, first, second


def test_user_dir_registers_models_in_real_fairseq_train(resumed_and_straight):
    _, straight, _, _ = resumed_and_straight
    assert "DeepNetTransformerModel" in straight
    assert "deepnorm(alpha=" in straight
    (active,) = [line for line in straight.splitlines() if "fairseq fixes active" in line]
    assert active.endswith(", ".join(fix.name for fix in FIXES))


def test_resume_equals_uninterrupted_run(resumed_and_straight):
    root, straight, first, second = resumed_and_straight
    assert "Loaded checkpoint" in second
    a = load_checkpoint(root / "straight" / "checkpoint_last.pt")
    b = load_checkpoint(root / "resumed" / "checkpoint_last.pt")
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 12
    assert a["model"].keys() == b["model"].keys()
    worst = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"])
    assert worst <= 1e-6, worst
    straight_losses = logged_updates(straight)
    resumed_losses = {**logged_updates(first), **logged_updates(second)}
    assert sorted(straight_losses) == list(range(1, 13))
    assert straight_losses == resumed_losses


def test_generate_from_checkpoint_best(resumed_and_straight, tiny_data):
    root, *_ = resumed_and_straight
    best = root / "straight" / "checkpoint_best.pt"
    proc = run([cli("fairseq-generate"), tiny_data, "--user-dir", USER_DIR, "--path", best, "--cpu",
                "--beam", "2", "--max-len-b", "12", "--batch-size", "16"])
    hypotheses = [line for line in proc.stdout.splitlines() if line.startswith("H-")]
    assert len(hypotheses) == 20  # every test sentence (fairseq main alone drops the last partial batch)
    assert "BLEU4" in proc.stdout


def test_interactive_and_hub_loading(resumed_and_straight, tiny_data):
    root, *_ = resumed_and_straight
    proc = run([cli("fairseq-interactive"), tiny_data, "--user-dir", USER_DIR,
                "--path", root / "straight" / "checkpoint_best.pt", "--cpu", "--beam", "2",
                "--source-lang", "src", "--target-lang", "tgt", "--input", "-"], check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]

    from fairseq.models.transformer import TransformerModel

    hub = TransformerModel.from_pretrained(
        str(root / "straight"), checkpoint_file="checkpoint_best.pt", data_name_or_path=str(tiny_data),
        source_lang="src", target_lang="tgt",
    )
    out = hub.translate("w1 w2 w3", beam=2)
    assert isinstance(out, str) and out.strip()


def test_real_checkpoints_need_only_allowlisted_globals(tiny_data, tmp_path):
    """EMA, --keep-best-checkpoints, --eval-bleu meters (fairseq-train in this process), and
    fairseq-hydra-train checkpoints (its console script)."""
    fairseq_main("train", train_args(tiny_data, tmp_path / "ema", "--max-update", "8", "--ema-decay", "0.9",
                                     "--store-ema", "--keep-best-checkpoints", "1", "--save-interval-updates", "4",
                                     "--eval-bleu", "--eval-bleu-args", '{"beam": 1, "max_len_b": 8}',
                                     "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric")[1:])
    config = tmp_path / "conf" / "tiny.yaml"
    config.parent.mkdir()
    config.write_text(
        "# @package _group_\n"
        f"common: {{cpu: true, seed: 1, user_dir: {USER_DIR}, no_progress_bar: true}}\n"
        f"task: {{_name: translation, data: {tiny_data}}}\n"
        "optimization: {max_update: 4, lr: [0.001]}\n"
        "dataset: {max_tokens: 500, num_workers: 0}\n"
        "optimizer: {_name: adam}\nlr_scheduler: {_name: fixed}\ncriterion: {_name: cross_entropy}\n"
        f"checkpoint: {{save_dir: {tmp_path / 'hydra'}}}\n"
        "model: {_name: deepnet_transformer_tiny, deepnorm: true, encoder_layers: 2, decoder_layers: 2}\n"
    )
    run([cli("fairseq-hydra-train"), "--config-dir", config.parent, "--config-name", "tiny",
         f"hydra.run.dir={tmp_path / 'hydra_out'}"])
    checkpoints = sorted((tmp_path / "ema").glob("*.pt")) + sorted((tmp_path / "hydra").glob("*.pt"))
    assert any("best_bleu" in p.name for p in checkpoints)
    assert len(checkpoints) >= 6
    allowed = _allowed_names()
    for path in checkpoints:
        needed = checkpoint_globals(path)
        assert needed <= allowed, (path.name, needed - allowed)
        state = load_checkpoint(path)
        assert "model" in state
        if (tmp_path / "ema") in path.parents:
            assert "ema" in state["extra_state"]
    for path in (tmp_path / "hydra").glob("*.pt"):
        assert load_checkpoint(path)["cfg"]["model"]["deepnorm"] is True


class _Payload:
    """Unpickling this runs ``marker.write_text`` via a reducer: the classic pickle exploit."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_malicious_checkpoint_is_refused_and_payload_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    bad = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "args": _Payload(marker)}, bad)
    with zipfile.ZipFile(bad) as archive:
        assert any(name.endswith("data.pkl") for name in archive.namelist())
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        torch.load(bad)
    with pytest.raises(RuntimeError, match="evil.pt"):
        load_checkpoint(bad)
    assert not marker.exists()


def test_malicious_checkpoint_refused_by_fairseq_generate(tmp_path, tiny_data):
    """fairseq-generate's cli_main (in this process) refuses the file before anything in it runs."""
    marker = tmp_path / "payload_ran"
    bad = tmp_path / "checkpoint_best.pt"
    torch.save({"model": {}, "args": _Payload(marker), "cfg": None}, bad)
    with pytest.raises(CheckpointLoadError) as refused:
        fairseq_main("generate", [tiny_data, "--user-dir", USER_DIR, "--path", bad, "--cpu"])
    assert "Weights only load failed" in str(refused.value) or "Unsupported global" in str(refused.value)
    assert not marker.exists()


def test_average_two_checkpoints_is_elementwise_mean(resumed_and_straight, tmp_path):
    root, *_ = resumed_and_straight
    first = root / "straight" / "checkpoint_best.pt"
    second = root / "resumed" / "checkpoint1.pt"
    a, b = load_checkpoint(first)["model"], load_checkpoint(second)["model"]
    perturbed = tmp_path / "perturbed.pt"
    state = load_checkpoint(second)
    state["model"] = {k: v + 0.5 if v.is_floating_point() else v for k, v in b.items()}
    torch.save(state, perturbed)
    out = tmp_path / "avg.pt"
    run([cli("deepnet-average-checkpoints"), "--inputs", first, perturbed, "--output", out])
    avg = load_checkpoint(out)["model"]
    for key, value in a.items():
        if value.is_floating_point():
            expected = (value.double() + (b[key].double() + 0.5)) / 2
            assert torch.allclose(avg[key].double(), expected, atol=1e-6), key
    with pytest.raises(ValueError, match="also an input"):
        average_checkpoints([first, out], out)


def test_averaged_checkpoint_generates(resumed_and_straight, tiny_data, tmp_path):
    root, *_ = resumed_and_straight
    """deepnet-average-checkpoints and fairseq-generate in this process (their console scripts run above)."""
    out = tmp_path / "avg.pt"
    with pytest.raises(SystemExit, match="wanted 1 update checkpoints, found 0"):  # the run saved none
        average_main(["--inputs", str(root / "straight"), "--num-update-checkpoints", "1", "--output", str(out)])
    assert average_main(["--inputs", str(root / "straight" / "checkpoint_best.pt"),
                         str(root / "straight" / "checkpoint_last.pt"), "--output", str(out)]) == 0
    output = generate_in_process([tiny_data, "--user-dir", USER_DIR, "--path", out, "--cpu", "--beam", "2",
                                  "--max-len-b", "12", "--batch-size", "16"], tmp_path / "gen")
    assert any(line.startswith("H-") for line in output.splitlines())
