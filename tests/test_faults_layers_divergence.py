"""Sub-layer identification in scheme layers, and which checkpoint a divergence report calls good."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_reliability import _FakeTrainer, train_in_process

import deepnet_fairseq  # noqa: F401
from conftest import train_args
from deepnet_fairseq.checkpoints import load_checkpoint
from deepnet_fairseq.divergence import DIVERGED_EXIT_CODE, EXPLODING_LOSS_FACTOR, DivergenceGuard
from modelkit import build, sample_batch

# --- sub-layer identification (modules/layers.py) ---------------------------------------------------


def admin_model(data, *flags):
    """A 2L-2L Admin model (eval, dropout 0) whose per-sub-layer omegas all differ, so a sub-layer
    combined with another one's omega changes the output."""
    model, task = build(data, "--residual-scheme", "admin", "--encoder-layers", 2, "--decoder-layers", 2,
                        "--dropout", 0, *flags)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "admin_omega_" in name:
                param.copy_(0.5 + 2.5 * torch.rand(param.shape, generator=gen))
    return model, task


def spy_on_combine(scheme):
    """Record ``(layer, sublayer)`` of every ``scheme.combine`` call (the scheme object is the test's own)."""
    seen = []
    combine = scheme.combine

    def spy(layer, sublayer, branch, residual):
        seen.append((layer, sublayer))
        return combine(layer, sublayer, branch, residual)

    scheme.combine = spy
    return seen


def post_ln_sublayers_without_cross(layer, x):
    """Admin's decoder layer computed by hand with the cross-attention block skipped."""
    attn, _ = layer.self_attn(query=x, key=x, value=x, need_weights=False)
    x = layer.self_attn_layer_norm(x * layer.admin_omega_self_attn + attn)
    ffn = layer.fc2(layer.activation_fn(layer.fc1(x)))
    return layer.final_layer_norm(x * layer.admin_omega_ffn + ffn)


def test_decoder_layer_called_without_encoder_out_combines_its_ffn_as_ffn(tiny_data):
    model, _ = admin_model(tiny_data)
    layer = model.decoder.layers[0]
    assert layer.encoder_attn is not None  # built with cross-attention
    seen = spy_on_combine(model.decoder.scheme)
    x = torch.randn(5, 3, layer.embed_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, _, _ = layer(x, encoder_out=None)
        expected = post_ln_sublayers_without_cross(layer, x)
    assert [name for _, name in seen] == ["self_attn", "ffn"]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_normal_calls_label_every_sublayer_in_order_on_its_own_layer(tiny_data):
    model, task = admin_model(tiny_data)
    encoder_seen = spy_on_combine(model.encoder.scheme)
    decoder_seen = spy_on_combine(model.decoder.scheme)
    with torch.no_grad():
        model(*sample_batch(task))
    assert encoder_seen == [(layer, name) for layer in model.encoder.layers for name in ("self_attn", "ffn")]
    assert decoder_seen == [
        (layer, name) for layer in model.decoder.layers for name in ("self_attn", "encoder_attn", "ffn")
    ]


def test_sublayer_hooks_follow_deepcopy_to_the_copied_layer(tiny_data):
    """fairseq's EMA deep-copies the model: the copy's hooks must mark the copy's layers."""
    model, task = admin_model(tiny_data)
    clone = copy.deepcopy(model)
    seen = spy_on_combine(clone.decoder.scheme)
    with torch.no_grad():
        out = clone(*sample_batch(task))[0]
        torch.testing.assert_close(out, model(*sample_batch(task))[0])
    assert seen == [(layer, name) for layer in clone.decoder.layers for name in ("self_attn", "encoder_attn", "ffn")]
    assert all(layer.running_sublayer is None for layer in [*model.decoder.layers, *clone.decoder.layers])


@pytest.mark.parametrize("with_encoder", [True, False])
def test_incremental_decoding_equals_full_forward(tiny_data, with_encoder):
    model, task = admin_model(tiny_data)
    src, lengths, prev = sample_batch(task)
    seen = spy_on_combine(model.decoder.scheme)
    with torch.no_grad():
        encoder_out = model.encoder(src, src_lengths=lengths) if with_encoder else None
        full, _ = model.decoder(prev, encoder_out=encoder_out)
        state = {}
        steps = [model.decoder(prev[:, : t + 1], encoder_out=encoder_out, incremental_state=state)[0]
                 for t in range(prev.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    names = ("self_attn", "encoder_attn", "ffn") if with_encoder else ("self_attn", "ffn")
    assert [name for _, name in seen] == list(names) * len(model.decoder.layers) * (1 + prev.size(1))


def test_activation_checkpointing_recomputes_with_the_same_labels(tiny_data):
    plain, _ = admin_model(tiny_data)
    ckpt, _ = admin_model(tiny_data, "--checkpoint-activations")
    x = torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(2))
    seen = spy_on_combine(ckpt.decoder.scheme)
    grads, outs = [], []
    for model in (plain, ckpt):
        model.train()
        layer = model.decoder.layers[0]
        out, _, _ = layer(x.clone().requires_grad_(), encoder_out=None)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append((layer.admin_omega_ffn.grad, layer.fc1.weight.grad))
    assert [name for _, name in seen] == ["self_attn", "ffn"] * 2  # forward, then recomputed in backward
    torch.testing.assert_close(outs[1], outs[0])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert ckpt.decoder.layers[0].admin_omega_encoder_attn.grad is None


def test_residual_connection_without_a_sublayer_module_is_refused(tiny_data):
    model, _ = admin_model(tiny_data)
    layer = model.decoder.layers[0]
    x = torch.zeros(2, 1, 64)
    with pytest.raises(RuntimeError, match=r"without one of its sub-layer modules \(self_attn, encoder_attn, fc1\)"):
        layer.residual_connection(x, x)


def test_residual_hooks_see_every_combine_and_are_removed_by_their_handle(tiny_data):
    """``register_residual_hook``: called with (layer, sub-layer, branch, residual) before every combine, in
    order; its handle removes it; a deep copy of the layer (EMA) starts without it."""
    model, task = admin_model(tiny_data)
    layer = model.decoder.layers[1]
    seen, combined = [], spy_on_combine(model.decoder.scheme)
    handle = layer.register_residual_hook(lambda *call: seen.append(call))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        model(*sample_batch(task))
        clone(*sample_batch(task))
    assert [(hooked, name) for hooked, name, _, _ in seen] == [
        (layer, name) for name in ("self_attn", "encoder_attn", "ffn")]
    assert [call for call in combined if call[0] is layer] == [(layer, name) for _, name, _, _ in seen]
    assert all(branch.shape == residual.shape == (6, 4, 64) for _, _, branch, residual in seen)
    assert not clone.decoder.layers[1]._residual_hooks
    handle.remove()
    with torch.no_grad():
        model(*sample_batch(task))
    assert len(seen) == 3 and not layer._residual_hooks


# --- Admin's profiling: a pre-hook on each stack, removed once the stack is profiled (schemes/admin.py) ---


def profiling_hooks(model):
    """``{side: whether its stack still has the profiling pre-hook}``."""
    return {side: stack.admin_profiling_hook.id in stack._forward_pre_hooks
            for side, stack in (("encoder", model.encoder), ("decoder", model.decoder))}


def test_admin_profiles_each_stack_on_its_first_training_forward_then_unhooks(tiny_data):
    model, task = build(tiny_data, "--residual-scheme", "admin", "--encoder-layers", 2, "--decoder-layers", 2,
                        "--dropout", 0)
    with torch.no_grad():
        model(*sample_batch(task))  # eval: no profiling
    assert profiling_hooks(model) == {"encoder": True, "decoder": True}
    assert all(float(layer.admin_profiled) == 0.0 for layer in [*model.encoder.layers, *model.decoder.layers])
    clone = copy.deepcopy(model)  # as fairseq's EMA, before training
    model.train()
    model(*sample_batch(task))
    assert profiling_hooks(model) == {"encoder": False, "decoder": False}
    assert all(float(layer.admin_profiled) == 1.0 for layer in [*model.encoder.layers, *model.decoder.layers])
    # the copy's hooks act on the copy: still unprofiled, profiles itself on its own first training forward
    assert profiling_hooks(clone) == {"encoder": True, "decoder": True}
    assert all(float(layer.admin_profiled) == 0.0 for layer in clone.decoder.layers)
    clone.train()
    clone(*sample_batch(task))
    assert profiling_hooks(clone) == {"encoder": False, "decoder": False}
    torch.testing.assert_close(clone.decoder.layers[1].admin_omega_ffn, model.decoder.layers[1].admin_omega_ffn)


def test_admin_loaded_as_profiled_is_not_profiled_again(tiny_data):
    """A checkpoint that says profiled keeps its ratios: the first training forward only removes the hook."""
    model, task = admin_model(tiny_data)  # omegas set to random values
    state = model.state_dict()
    for key in state:
        if key.endswith("admin_profiled"):
            state[key] = torch.ones(())
    fresh, _ = build(tiny_data, "--residual-scheme", "admin", "--encoder-layers", 2, "--decoder-layers", 2,
                     "--dropout", 0)
    fresh.load_state_dict(state)
    fresh.train()
    fresh(*sample_batch(task))
    assert profiling_hooks(fresh) == {"encoder": False, "decoder": False}
    for name, param in fresh.named_parameters():
        if "admin_omega_" in name:
            assert torch.equal(param, state[name]), name


# --- which checkpoint a divergence report calls good (divergence.py) ------------------------------


def save_fake_checkpoint(path, updates, val_loss):
    torch.save({"optimizer_history": [{"num_updates": updates}], "extra_state": {"val_loss": val_loss}}, path)


def test_exploding_loss_rule_and_newest_good_checkpoint(tmp_path):
    guard = DivergenceGuard(_FakeTrainer(str(tmp_path)))
    for update, loss in ((1, 6.0), (2, 5.0), (3, 5.0 * EXPLODING_LOSS_FACTOR + 1), (4, 5.0 * EXPLODING_LOSS_FACTOR)):
        guard.record_loss(update, loss)
    assert sorted(guard.unhealthy) == [3]  # over 10x the lowest so far; exactly 10x is still healthy
    save_fake_checkpoint(tmp_path / "checkpoint_last.pt", 3, 5.1)
    save_fake_checkpoint(tmp_path / "checkpoint_2_3.pt", 3, 5.1)
    save_fake_checkpoint(tmp_path / "checkpoint1.pt", 2, 5.1)  # end of epoch 1: its next update exploded
    save_fake_checkpoint(tmp_path / "checkpoint_1_1.pt", 1, 5.5)
    save_fake_checkpoint(tmp_path / "checkpoint_best.pt", 3, 5.1)
    assert [p.rsplit("/", 1)[1] for p in guard.candidate_checkpoints()] == [
        "checkpoint_last.pt", "checkpoint_2_3.pt", "checkpoint1.pt", "checkpoint_1_1.pt", "checkpoint_best.pt"]
    named = guard.last_good_checkpoint()
    assert named.startswith(f"{tmp_path / 'checkpoint_1_1.pt'} (update 1, valid loss 5.5")
    assert "training loss healthy at update 1 and 2" in named
    (tmp_path / "checkpoint_1_1.pt").unlink()
    (tmp_path / "checkpoint_best.pt").unlink()
    save_fake_checkpoint(tmp_path / "checkpoint_best.pt", 40, None)  # from a run this guard did not see
    report = guard.last_good_checkpoint()
    assert report.startswith(f"no checkpoint known to be good in {tmp_path}: checkpoint_last.pt (update 3")
    assert "checkpoint_2_3.pt (as checkpoint_last.pt)" in report
    assert "training loss 51 at update 3 over 10x the lowest up to then (5)" in report
    assert "checkpoint_best.pt (update 40, no validation score recorded and no training loss" in report


def diverged_report(caplog) -> str:
    messages = [r.getMessage() for r in caplog.records if "Training diverged" in r.getMessage()]
    assert len(messages) == 1
    return messages[0]


@pytest.fixture
def fresh_best(monkeypatch):
    """fairseq keeps the best validation score on ``save_checkpoint`` across in-process runs."""
    from fairseq import checkpoint_utils

    monkeypatch.delattr(checkpoint_utils.save_checkpoint, "best", raising=False)


def test_exploded_checkpoint_is_not_called_good(tiny_data, tmp_path, monkeypatch, caplog, fresh_best):
    save = tmp_path / "run"
    argv = train_args(tiny_data, save, "--deepnorm", "--optimizer", "sgd", "--lr", "1e6", "--max-update", "10",
                      "--save-interval-updates", "2", "--stop-on-divergence-patience", "2")[1:]
    code = train_in_process(argv, monkeypatch)
    assert code == 3 and DIVERGED_EXIT_CODE == 3  # documented exit code
    exploded = load_checkpoint(save / "checkpoint_last.pt")
    assert exploded["optimizer_history"][-1]["num_updates"] == 2
    assert math.isnan(exploded["extra_state"]["val_loss"])
    report = diverged_report(caplog)
    assert "Training diverged at update 3" in report
    assert f"Last good checkpoint: {save / 'checkpoint_last.pt'}" not in report
    assert f"Last good checkpoint: no checkpoint known to be good in {save}: checkpoint_last.pt (update 2, " in report
    assert "valid loss nan" in report and "at update 2 over 10x the lowest up to then" in report
    assert "checkpoint_1_2.pt (as checkpoint_last.pt)" in report


def test_newest_good_checkpoint_is_named_when_later_ones_exploded(tiny_data, tmp_path, monkeypatch, caplog,
                                                                   fresh_best):
    """Two updates per epoch; lr 0.1 for epoch 1, then 1e6: update 4 explodes and ends epoch 2."""
    save = tmp_path / "run"
    argv = train_args(tiny_data, save, "--deepnorm", "--optimizer", "sgd", "--lr-scheduler", "fixed",
                      "--lr", "0.1,1e6", "--max-tokens", "2000", "--max-update", "16",
                      "--stop-on-divergence-patience", "2")[1:]
    assert train_in_process(argv, monkeypatch) == 3
    for name in ("checkpoint_last.pt", "checkpoint2.pt"):
        assert load_checkpoint(save / name)["optimizer_history"][-1]["num_updates"] == 4
    report = diverged_report(caplog)
    assert "Training diverged at update 5" in report
    assert f"Last good checkpoint: {save / 'checkpoint1.pt'} (update 2, valid loss " in report
    assert "training loss healthy at update 2 and 3" in report


class _ModelTrainer(_FakeTrainer):
    """:class:`_FakeTrainer` around a real model."""

    def __init__(self, save_dir, model):
        super().__init__(save_dir)
        self.model = model


@pytest.mark.parametrize("flags,description", [
    (("--deepnorm",), "2L-3L, encoder scheme deepnorm(alpha="),
    (("--residual-scheme", "post-ln"), "2L-3L, scheme post-ln,"),
    (("--residual-scheme", "rezero"), "2L-3L, scheme rezero,"),
])
def test_divergence_report_describes_every_stack_and_asks_the_schemes_for_hints(tiny_data, tmp_path, flags,
                                                                                description):
    """The report's description and hint come from each stack's scheme: DeepNorm (both stacks described,
    their alphas differ) suggests nothing more, any other scheme suggests DeepNorm, once."""
    model, _ = build(tiny_data, *flags, "--encoder-layers", 2, "--decoder-layers", 3)
    trainer = _ModelTrainer(str(tmp_path), model)
    report = DivergenceGuard(trainer).report(trainer, "loss is NaN")
    assert description in report
    if "--deepnorm" in flags:
        assert ", decoder scheme deepnorm(alpha=" in report and "--residual-scheme deepnorm" not in report
    else:
        assert report.count(", or --residual-scheme deepnorm.") == 1
