"""--log-stability: values equal to direct computations; no extra work when off."""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys

import pytest
import torch
from fairseq.logging import metrics

import deepnet_fairseq  # noqa: F401
from conftest import fairseq_main, train_args
from deepnet_fairseq.stability import output_features, rms_norm_per_token
from modelkit import build, sample_batch


def _net_input(task):
    src, lengths, prev = sample_batch(task, n=5, src_len=8, tgt_len=7)
    src[0, :2] = task.source_dictionary.pad()  # left padding, as fairseq batches it
    lengths[0] = 6
    return {"src_tokens": src, "src_lengths": lengths, "prev_output_tokens": prev}


def test_instruments_equal_direct_computation(tiny_data):
    model, task = build(tiny_data, "--deepnorm", "--encoder-layers", 2, "--decoder-layers", 2, "--dropout", 0,
                        "--log-stability", "--stability-interval", 1)
    monitor = model.stability_monitor
    net_input = _net_input(task)
    layer = model.decoder.layers[1]
    seen = {}
    hooks = [
        layer.encoder_attn_layer_norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("ln_in", a[0].clone())),
        layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone())),
        layer.self_attn.register_forward_hook(lambda m, a, o: seen.__setitem__("g", o[0].clone())),
    ]
    model.train()
    with metrics.aggregate(new_root=True) as agg:
        out, _ = model(**net_input)
        out.float().logsumexp(-1).mean().backward()
        logged = {k: v.avg for k, v in agg.items()}
    for h in hooks:
        h.remove()
    # LN input norm ||x|| / sqrt(d) per token, mean over the decoder's (unpadded) tokens
    direct_ln = (seen["ln_in"].pow(2).mean(-1).sqrt()).mean().item()
    assert logged["stab_dec02_encoder_attn_ln"] == pytest.approx(direct_ln, rel=1e-3)
    direct_ratio = (seen["g"].norm(dim=-1) / seen["x"].norm(dim=-1)).mean().item()
    assert logged["stab_dec02_self_attn_ratio"] == pytest.approx(direct_ratio, rel=1e-3)
    grads = [p.grad for p in list(layer.fc1.parameters()) + list(layer.fc2.parameters())]
    direct_gnorm = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
    assert logged["stab_dec02_ffn_gnorm"] == pytest.approx(direct_gnorm, rel=1e-3)
    # encoder layer 1 sees padding (zero vectors): only real tokens count
    assert 0 < logged["stab_enc01_self_attn_ratio"] < 100
    assert logged["stab_update"] == 0.0  # theta_0 is the reference
    # model update after a parameter change: ||F(x; theta_t) - F(x; theta_0)|| on the probe batch
    model.eval()
    with torch.no_grad():
        before = output_features(model, net_input)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        after = output_features(model, net_input)
    direct_update = (after - before).norm(dim=-1).mean().item()
    model.train()
    with metrics.aggregate(new_root=True) as agg:
        model(**_net_input(task))  # another batch: the probe stays the first one
        assert agg["stab_update"].avg == pytest.approx(direct_update, rel=1e-3)
    assert monitor.probe["src_tokens"].equal(net_input["src_tokens"])


def _count_encoder_forwards(tiny_data, save, monkeypatch, *flags):
    from fairseq.models.transformer import TransformerEncoderBase
    from fairseq_cli import train

    calls = {"n": 0}
    original = TransformerEncoderBase.forward

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TransformerEncoderBase, "forward", counting)
    argv = train_args(tiny_data, save, "--deepnorm", "--max-update", "4", "--disable-validation", *flags)[1:]
    monkeypatch.setattr(sys, "argv", ["fairseq-train", *map(str, argv)])
    train.cli_main()
    return calls["n"]


def test_no_extra_forward_passes_when_off(tiny_data, tmp_path, monkeypatch):
    off = _count_encoder_forwards(tiny_data, tmp_path / "off", monkeypatch)
    on = _count_encoder_forwards(tiny_data, tmp_path / "on", monkeypatch, "--log-stability",
                                 "--stability-interval", "2")
    assert off == 4  # one forward per update, nothing else
    assert on == 4 + 2  # plus one probe forward at updates 0 and 2


def test_gradient_norms_measured_once_per_measurement_update(tiny_data, monkeypatch):
    """Each measured backward logs every sub-layer's gnorm once; unmeasured ones log none (hooks removed)."""
    model, task = build(tiny_data, "--deepnorm", "--encoder-layers", 2, "--decoder-layers", 2, "--dropout", 0,
                        "--log-stability", "--stability-interval", 2)
    sublayers = [f"{name}_{sub}_gnorm" for name, layer in model.stability_monitor.layers for sub in layer.sublayers]
    assert len(sublayers) == 2 * 2 + 2 * 3  # encoder: self_attn, ffn; decoder: + encoder_attn
    logged = []
    original = metrics.log_scalar

    def counting(key, *args, **kwargs):
        if key.endswith("_gnorm"):
            logged[-1].append(key)
        return original(key, *args, **kwargs)

    monkeypatch.setattr(metrics, "log_scalar", counting)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    for update in range(20):
        model.set_num_updates(update)
        logged.append([])
        out, _ = model(**_net_input(task))
        out.float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    once = sorted(f"stab_{k}" for k in sublayers)
    assert [sorted(keys) for keys in logged] == [once if update % 2 == 0 else [] for update in range(20)]
    # a measured forward without backward (e.g. a skipped batch) leaves no hooks for the next measurement
    model.set_num_updates(20)
    model(**_net_input(task))
    logged.append([])
    out, _ = model(**_net_input(task))
    out.float().logsumexp(-1).mean().backward()
    assert sorted(logged[-1]) == once


def test_tensorboard_logdir_receives_stability_scalars(tiny_data, tmp_path, monkeypatch):
    """fairseq-train --log-stability --tensorboard-logdir writes the stab_* scalars to event files."""
    from fairseq.logging import progress_bar
    from fairseq_cli import train

    assert progress_bar.SummaryWriter is not None, "tensorboard is not installed: pip install -r requirements.txt"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writers = {}  # fairseq caches one writer per tag for the whole process: keep this run's apart
    monkeypatch.setattr(progress_bar, "_tensorboard_writers", writers)
    logdir = tmp_path / "tb"
    argv = train_args(tiny_data, tmp_path / "ckpt", "--deepnorm", "--max-update", "4", "--disable-validation",
                      "--no-save", "--log-stability", "--stability-interval", "2",
                      "--tensorboard-logdir", str(logdir))[1:]
    monkeypatch.setattr(sys, "argv", ["fairseq-train", *map(str, argv)])
    try:
        train.cli_main()
    finally:
        for writer in writers.values():
            writer.close()
    events = EventAccumulator(str(logdir / "train_inner"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("stab_update", "stab_ln_max", "stab_ratio_max", "stab_dec02_ffn_gnorm", "stab_enc01_self_attn_ln",
                "stab_dec01_encoder_attn_ratio"):
        assert tag in tags
    # measured at updates 0 and 2 (logged as steps 1 and 3), with the first update norm 0 (theta_0)
    update = events.Scalars("stab_update")
    assert [e.step for e in update] == [1, 3]
    assert update[0].value == 0.0 and update[1].value > 0
    assert all(e.value > 0 for e in events.Scalars("stab_dec02_ffn_gnorm"))
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


# every sub-layer of a 2L-2L encoder-decoder and the LayerNorm that sub-layer's instrument must read
SUBLAYER_LAYER_NORMS = {"self_attn": "self_attn_layer_norm", "encoder_attn": "encoder_attn_layer_norm",
                        "ffn": "final_layer_norm"}
EXPECTED_SUBLAYERS = [f"enc{i:02d}_{s}" for i in (1, 2) for s in ("self_attn", "ffn")] + [
    f"dec{i:02d}_{s}" for i in (1, 2) for s in ("self_attn", "encoder_attn", "ffn")]


def _instrumented_model(tiny_data):
    model, task = build(tiny_data, "--deepnorm", "--encoder-layers", 2, "--decoder-layers", 2, "--dropout", 0,
                        "--log-stability", "--stability-interval", 1)
    model.train()
    return model, task


def _record_residuals(layer, key, residuals):
    """Wrap ``layer.residual_connection`` (an instance attribute; ``del`` restores the method) so that it
    records the branch G(x) and residual x it combines, keyed ``<key>_<sub-layer>``."""
    combine = layer.residual_connection

    def recording(branch, residual):
        residuals[f"{key}_{layer.running_sublayer}"] = (branch.detach().clone(), residual.detach().clone())
        return combine(branch, residual)

    layer.residual_connection = recording


def _measure_ln_inputs(model, net_input):
    """One measured training forward; returns the logged values, every sub-layer LayerNorm's input and every
    sub-layer's (branch, residual) pair, recorded by this test's own hooks (keyed like the instruments:
    ``dec02_encoder_attn``).  Works for the encoder-decoder, the decoder-only LM and the encoder-only RoBERTa."""
    inputs, residuals, handles = {}, {}, []
    encoder = getattr(model, "encoder", None)
    encoder = getattr(encoder, "sentence_encoder", encoder)  # RoBERTa's layer stack
    decoder = getattr(model, "decoder", None)
    stacks = [(side, stack.layers) for side, stack in (("enc", encoder), ("dec", decoder)) if stack is not None]
    layers = [(f"{side}{index:02d}", layer) for side, stack in stacks for index, layer in enumerate(stack, start=1)]
    for name, layer in layers:
        _record_residuals(layer, name, residuals)
        for sublayer in layer.sublayers:
            norm = layer.get_submodule(SUBLAYER_LAYER_NORMS[sublayer])
            key = f"{name}_{sublayer}"
            handles.append(norm.register_forward_pre_hook(
                lambda module, args, key=key: inputs.__setitem__(key, args[0].detach().clone())))
    try:
        with metrics.aggregate(new_root=True) as agg:
            model(**net_input)
            logged = {k: v.avg for k, v in agg.items()}
    finally:
        for handle in handles:
            handle.remove()
        for _, layer in layers:
            del layer.residual_connection
    return logged, inputs, residuals


def _direct_rms(x, real):
    """Mean over real (non-padding) tokens of ||x_token|| / sqrt(d); x is T x B x C, real is B x T."""
    return x.double().pow(2).mean(-1).sqrt()[real.t()].mean().item()


def _direct_ratio(branch, residual, real):
    """Mean over real tokens of ||G(x)_token|| / ||x_token||; tensors T x B x C, real B x T."""
    return (branch.double().norm(dim=-1) / residual.double().norm(dim=-1))[real.t()].mean().item()


def _direct_update(model, net_input, real):
    """Perturb every parameter; return ||F(x; theta_1) - F(x; theta_0)|| per token (F: the model's output
    features, the decoder's or an encoder-only model's encoder's, B x T x C), averaged over the real tokens
    (``real``: B x T) and over all tokens."""
    model.eval()
    with torch.no_grad():
        before = model(**net_input, features_only=True)[0]
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        after = model(**net_input, features_only=True)[0]
    model.train()
    change = (after - before).double().norm(dim=-1)
    return change[real].mean().item(), change.mean().item()


def _assert_padding_left_out(model, net_input, real):
    """Every ``_ln``/``_ratio`` value and ``stab_update`` equal direct computations over the real tokens
    (``real``: B x T masks by side), while averaging over all positions would give other values."""
    logged, inputs, residuals = _measure_ln_inputs(model, net_input)
    keys = sorted(inputs)
    assert sorted(residuals) == keys
    padding_matters = []
    for key in keys:
        mask = real[key[:3]]
        direct_ln = _direct_rms(inputs[key], mask)
        assert logged[f"stab_{key}_ln"] == pytest.approx(direct_ln, rel=1e-5), key
        assert logged[f"stab_{key}_ratio"] == pytest.approx(_direct_ratio(*residuals[key], mask), rel=1e-5), key
        padding_matters.append(direct_ln != pytest.approx(_direct_rms(inputs[key], torch.ones_like(mask)), rel=1e-3))
    later = [key for key in keys if not key.endswith("01_self_attn")]  # past the first sub-layer of a stack
    later_ratios = [logged[f"stab_{key}_ratio"] for key in later]
    all_positions = [_direct_ratio(*residuals[key], torch.ones_like(real[key[:3]])) for key in later]
    assert later_ratios != pytest.approx(all_positions, rel=1e-3)  # padded positions are not zero there
    assert any(padding_matters)
    torch.manual_seed(0)
    direct_real, direct_all = _direct_update(model, net_input, real["dec" if "dec" in real else "enc"])
    assert direct_real != pytest.approx(direct_all, rel=1e-3)
    with metrics.aggregate(new_root=True) as agg:
        model(**net_input)
        assert agg["stab_update"].avg == pytest.approx(direct_real, rel=1e-4)


def test_every_sublayer_ln_norm_equals_direct_rms_of_its_layernorm_input(tiny_data):
    """``stab_<layer>_<sub-layer>_ln`` of all 10 sub-layers (self_attn, encoder_attn, ffn; encoder and
    decoder) equals the per-token RMS of the input of that sub-layer's own LayerNorm."""
    model, task = _instrumented_model(tiny_data)
    src, lengths, prev = sample_batch(task, n=5, src_len=8, tgt_len=7)
    logged, inputs, _ = _measure_ln_inputs(model, {"src_tokens": src, "src_lengths": lengths,
                                                   "prev_output_tokens": prev})
    assert sorted(k[len("stab_"):-len("_ln")] for k in logged if k.endswith("_ln") and k != "stab_ln_max") == sorted(
        EXPECTED_SUBLAYERS)
    real = {"enc": torch.ones_like(src, dtype=torch.bool), "dec": torch.ones_like(prev, dtype=torch.bool)}
    direct = {key: _direct_rms(inputs[key], real[key[:3]]) for key in EXPECTED_SUBLAYERS}
    assert len(set(round(v, 6) for v in direct.values())) == len(direct)  # 10 different LayerNorm inputs
    for key, value in direct.items():
        assert logged[f"stab_{key}_ln"] == pytest.approx(value, rel=1e-5), key
    assert logged["stab_ln_max"] == pytest.approx(max(direct.values()), rel=1e-5)


def test_ln_norms_ratios_and_model_update_leave_out_padding(tiny_data):
    """With source left padding and target right padding (as fairseq batches them), every ``_ln`` value is
    the RMS over real tokens only, every ``_ratio`` the branch ratio over real tokens only (encoder layers:
    the source's, decoder layers: the target's), and ``stab_update`` the feature-change norm over real
    target tokens only."""
    model, task = _instrumented_model(tiny_data)
    pad = task.source_dictionary.pad()
    net_input = _net_input(task)  # source row 0 left-padded by 2
    net_input["prev_output_tokens"][1, -3:] = pad  # target row 1 right-padded by 3
    real = {"enc": net_input["src_tokens"].ne(pad), "dec": net_input["prev_output_tokens"].ne(pad)}
    _assert_padding_left_out(model, net_input, real)


ROBERTA_TINY = ("--encoder-layers", 2, "--encoder-embed-dim", 32, "--encoder-ffn-embed-dim", 64,
                "--encoder-attention-heads", 2)


@pytest.fixture(scope="module")
def lm_dict(tiny_data, tmp_path_factory):
    """A language_modeling data directory: only its dictionary is needed to build a model."""
    root = tmp_path_factory.mktemp("lm_dict")
    shutil.copy(tiny_data / "dict.src.txt", root / "dict.txt")
    return root


def test_language_model_instruments_leave_out_padding(lm_dict):
    """deepnet_lm: its decoder layers' padding comes from ``src_tokens`` (right padding, as
    ``--sample-break-mode eos`` batches it); ``_ln``, ``_ratio`` and ``stab_update`` leave it out."""
    model, task = build(lm_dict, "--deepnorm", "--decoder-layers", 2, "--decoder-embed-dim", 32,
                        "--decoder-ffn-embed-dim", 64, "--decoder-attention-heads", 2, "--dropout", 0,
                        "--log-stability", "--stability-interval", 1, task_name="language_modeling",
                        arch="deepnet_lm")
    model.train()
    pad = task.dictionary.pad()
    tokens = torch.randint(4, len(task.dictionary), (4, 9), generator=torch.Generator().manual_seed(0))
    tokens[1, -3:] = pad
    tokens[2, -5:] = pad
    _assert_padding_left_out(model, {"src_tokens": tokens}, {"dec": tokens.ne(pad)})


def test_roberta_instruments_cover_its_encoder_and_leave_out_padding(lm_dict):
    """deepnet_roberta (encoder-only; layers in ``model.encoder.sentence_encoder``): every encoder sub-layer is
    measured, padding (``sentence_encoder.padding_idx``) is left out, and ``stab_update`` is the change of
    the encoder's output features."""
    model, task = build(lm_dict, "--deepnorm", *ROBERTA_TINY, "--dropout", 0, "--attention-dropout", 0,
                        "--log-stability",
                        "--stability-interval", 1, task_name="masked_lm", arch="deepnet_roberta_tiny")
    model.train()
    pad = model.encoder.sentence_encoder.padding_idx
    tokens = torch.randint(4, len(task.source_dictionary) - 1, (3, 9), generator=torch.Generator().manual_seed(0))
    tokens[1, -4:] = pad
    with metrics.aggregate(new_root=True) as agg:
        model(tokens)[0].float().logsumexp(-1).mean().backward()
        logged = {k: v.avg for k, v in agg.items()}
    expected = {f"stab_enc{i:02d}_{s}_{q}" for i in (1, 2) for s in ("self_attn", "ffn")
                for q in ("ln", "ratio", "gnorm")}
    assert expected <= set(logged) and all(math.isfinite(logged[key]) for key in expected)
    assert logged["stab_update"] == 0.0  # the first measurement is the reference
    _assert_padding_left_out(model, {"src_tokens": tokens}, {"enc": tokens.ne(pad)})


def test_padding_mask_must_match_the_activations():
    """An activation whose token positions do not match the batch's mask (e.g. incremental decoding's single
    step) is an error naming the flag, not a silently wrong average."""
    with pytest.raises(RuntimeError, match="--log-stability.*padding mask"):
        rms_norm_per_token(torch.ones(1, 2, 4), torch.ones(3, 2, dtype=torch.bool))


def test_model_update_probe_stays_the_first_batch(tiny_data):
    """The probe is the first measured batch: later measurements on other batches (another seed and shape)
    report ``||F(x1; theta_t) - F(x1; theta_0)||`` on that first batch x1, computed here directly."""
    model, task = _instrumented_model(tiny_data)
    first = _net_input(task)
    src, lengths, prev = sample_batch(task, n=3, src_len=5, tgt_len=4, seed=1)
    second = {"src_tokens": src, "src_lengths": lengths, "prev_output_tokens": prev}
    model.eval()
    with torch.no_grad():
        features_0 = {name: model(**batch, features_only=True)[0] for name, batch in (("first", first),
                                                                                    ("second", second))}
    model.train()
    with metrics.aggregate(new_root=True) as agg:
        model(**first)
        assert agg["stab_update"].avg == 0.0  # theta_0 is the reference
    torch.manual_seed(1)  # the parameter changes below
    for step in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.eval()
        with torch.no_grad():
            features_t = {name: model(**batch, features_only=True)[0] for name, batch in (("first", first),
                                                                                        ("second", second))}
        model.train()
        direct = {name: (features_t[name] - features_0[name]).double().norm(dim=-1).mean().item()
                  for name in features_t}
        # the tolerance below tells the two batches apart
        assert direct["first"] != pytest.approx(direct["second"], rel=1e-3)
        with metrics.aggregate(new_root=True) as agg:
            model(**second)
            assert agg["stab_update"].avg == pytest.approx(direct["first"], rel=1e-4), step
    for key, value in first.items():
        assert model.stability_monitor.probe[key].equal(value), key


def test_failed_measured_forward_leaves_no_measurement_behind(tiny_data):
    """An out-of-memory batch that fairseq skips raises inside the measured forward: the next batch, of
    another shape, must measure cleanly (no stale masks, no leftover gradient hooks)."""
    model, task = build(tiny_data, "--deepnorm", "--encoder-layers", 2, "--decoder-layers", 2, "--dropout", 0,
                        "--log-stability", "--stability-interval", 1)
    monitor = model.stability_monitor
    model.train()
    failing = model.decoder.layers[0].register_forward_hook(lambda m, a, o: (_ for _ in ()).throw(RuntimeError("oom")))
    with pytest.raises(RuntimeError, match="oom"):
        model(**_net_input(task))
    failing.remove()
    assert not monitor.grad_hooks
    src, lengths, prev = sample_batch(task, n=3, src_len=5, tgt_len=4, seed=1)
    with metrics.aggregate(new_root=True) as agg:
        out, _ = model(src, lengths, prev)
        out.float().logsumexp(-1).mean().backward()
        assert sum(1 for key in agg.keys() if key.endswith("_gnorm")) == 10


# --- the instruments' hooks exist only inside a measured forward -----------------------------------------


def _hook_counts(model):
    """Forward pre-hooks, forward hooks and residual hooks (scheme layers) on every module of ``model``."""
    modules = list(model.modules())
    return (sum(len(m._forward_pre_hooks) for m in modules), sum(len(m._forward_hooks) for m in modules),
            sum(len(m._residual_hooks) for m in modules if hasattr(m, "_residual_hooks")))


def _pair(tiny_data, interval=1):
    """The same 2L-2L DeepNorm model built with and without --log-stability (training mode)."""
    flags = ("--deepnorm", "--encoder-layers", 2, "--decoder-layers", 2, "--dropout", 0)
    plain, task = build(tiny_data, *flags)
    instrumented, _ = build(tiny_data, *flags, "--log-stability", "--stability-interval", interval)
    plain.train()
    instrumented.train()
    return plain, instrumented, task


def test_no_instrument_hook_outlives_a_measured_forward(tiny_data):
    """After a measured training step, and after a measured forward that raised, every module carries
    exactly the hooks of the same model built without --log-stability; no gradient hook is left."""
    plain, model, task = _pair(tiny_data)
    baseline = _hook_counts(plain)
    assert _hook_counts(model) == baseline  # nothing registered at build
    during = []  # the measured forward, then the probe forward (hooks removed)
    probe = model.decoder.layers[-1].register_forward_pre_hook(lambda m, a: during.append(_hook_counts(model)))
    with metrics.aggregate(new_root=True) as agg:
        model(**_net_input(task))[0].float().logsumexp(-1).mean().backward()
        assert "stab_dec02_ffn_gnorm" in agg.keys()
    probe.remove()
    assert during[0][0] == baseline[0] + 1 + 10 and during[0][2] == 4  # LayerNorm and residual hooks
    assert during[1] == (baseline[0] + 1, *baseline[1:])  # the probe forward runs unhooked
    assert _hook_counts(model) == baseline and not model.stability_monitor.grad_hooks
    failing = model.decoder.layers[0].register_forward_hook(lambda m, a, o: (_ for _ in ()).throw(RuntimeError("oom")))
    with pytest.raises(RuntimeError, match="oom"):
        model(**_net_input(task))
    failing.remove()
    assert _hook_counts(model) == baseline and not model.stability_monitor.grad_hooks


def test_unmeasured_steps_register_no_hook(tiny_data):
    """On an update that is not a measurement step the forward runs with the plain model's hooks only."""
    plain, model, task = _pair(tiny_data, interval=2)
    baseline = _hook_counts(plain)
    seen = []
    probe = model.decoder.layers[-1].register_forward_pre_hook(lambda m, a: seen.append(_hook_counts(model)))
    for update in (1, 2, 3):
        model.set_num_updates(update)
        with metrics.aggregate(new_root=True):
            model(**_net_input(task))[0].float().logsumexp(-1).mean().backward()
    probe.remove()
    with_probe = (baseline[0] + 1, *baseline[1:])
    measured = (baseline[0] + 1 + 10, baseline[1], 4)  # update 2: LayerNorm and residual hooks, then the probe
    assert seen == [with_probe, measured, with_probe, with_probe]


def test_deep_copy_of_a_measured_model_carries_no_measurement_hook(tiny_data):
    """fairseq's EMA deep-copies the model: the copy of a measured model (after a measurement, or taken in
    the middle of one) has no hook of the instruments and computes the same output."""
    plain, model, task = _pair(tiny_data)
    baseline = _hook_counts(plain)
    with metrics.aggregate(new_root=True):
        model(**_net_input(task))[0].float().logsumexp(-1).mean().backward()
    clone = copy.deepcopy(model)
    assert _hook_counts(clone) == baseline
    copies = []
    grab = model.decoder.layers[-1].register_forward_pre_hook(lambda m, a: copies.append(copy.deepcopy(model)))
    with metrics.aggregate(new_root=True):
        model(**_net_input(task))
    grab.remove()
    assert _hook_counts(copies[0])[2] == 0  # the residual hooks stay with the measured layers
    model.eval()
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(**_net_input(task))[0], model(**_net_input(task))[0])


def _train_inner_records(log: str) -> dict:
    """{num_updates: the json train_inner record} of a fairseq-train log."""
    records = {}
    for line in log.splitlines():
        start = line.find("{")
        if "train_inner" in line and start >= 0:
            record = json.loads(line[start:])
            records[int(record["num_updates"])] = record
    return records


def test_unmeasured_updates_and_a_resume_without_the_flag_log_no_stability_keys(tiny_data, tmp_path):
    """Only measured updates carry stab_* values: no ``stab_...=None`` for every sub-layer on the others,
    and none left over from the metrics state a checkpoint restores when resumed without --log-stability."""
    save = tmp_path / "ckpt"
    _, log = fairseq_main("train", train_args(tiny_data, save, "--deepnorm", "--max-update", "4",
                                              "--disable-validation", "--log-stability",
                                              "--stability-interval", "2")[1:])
    records = _train_inner_records(log)
    stab = {update: {k: v for k, v in record.items() if k.startswith("stab_")} for update, record in records.items()}
    assert sorted(stab) == [1, 2, 3, 4]
    for update in (1, 3):  # updates 0 and 2 are measured
        assert stab[update] and all(value is not None for value in stab[update].values())
    assert stab[2] == {} and stab[4] == {}
    _, log = fairseq_main("train", train_args(tiny_data, save, "--deepnorm", "--max-update", "6",
                                              "--disable-validation")[1:])
    resumed = _train_inner_records(log)
    assert sorted(resumed) == [5, 6]
    assert all(not key.startswith("stab_") for record in resumed.values() for key in record)
