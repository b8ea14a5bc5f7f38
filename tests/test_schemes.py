"""--residual-scheme: each scheme's defining formula, measured with hooks in a model built the way
fairseq builds it; plus training, save/load and generation for every scheme."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import USER_DIR, fairseq_main, generate_in_process, logged_updates, train_args
from deepnet_fairseq.schemes import SCHEME_NAMES, DeepNetConfigError
from modelkit import build, capture, check_ln_inputs, pooled_std, residual_io, sample_batch

N, M = 3, 2
XAVIER_UNIFORM_STD = math.sqrt(2 / (64 + 64)), math.sqrt(2 / (64 + 128))  # square / FFN matrices, d=64


def scheme_model(data, name, *flags, n=N, m=M):
    return build(data, "--residual-scheme", name, "--encoder-layers", n, "--decoder-layers", m, "--dropout", 0, *flags)


def layer_io(layers, run_forward):
    """[(input, output)] of every layer (first positional input; output's first item)."""
    with capture({str(i): layer for i, layer in enumerate(layers)}) as seen:
        run_forward()
    return [(seen.inputs[str(i)], seen.outputs[str(i)]) for i in range(len(layers))]


def is_normalized(x, eps=1e-3):
    """LayerNorm output with its initial affine (1, 0): zero mean per position, variance
    var/(var + 1e-5) <= 1 (a little below 1 where the normalised input was tiny)."""
    var = x.var(-1, unbiased=False)
    return x.mean(-1).abs().max().item() < eps and var.max().item() <= 1 + 1e-4 and var.min().item() > 0.8


def count_layer_norms(module):
    return sum(isinstance(m, nn.LayerNorm) for m in module.modules())


def test_every_named_scheme_is_registered():
    assert set(SCHEME_NAMES) == {
        "post-ln", "pre-ln", "deepnorm", "post-ln-init", "ds-init", "admin", "admin-closed", "rezero",
        "t-fixup", "r-fixup", "dlcl", "normformer", "sub-ln", "sandwich-ln",
    }


def test_post_ln(tiny_data):
    model, task = scheme_model(tiny_data, "post-ln")
    src, lengths, prev = sample_batch(task)
    with torch.no_grad():
        checked = check_ln_inputs(model.decoder.layers, lambda: model(src, lengths, prev), 1.0, {"self", "cross"})
    assert checked == 3 * M
    assert model.encoder.layer_norm is None


def test_pre_ln_normalizes_before_each_sublayer_and_has_final_norm(tiny_data):
    model, task = scheme_model(tiny_data, "pre-ln")
    src, lengths, prev = sample_batch(task)
    layer = model.encoder.layers[1]
    with capture({"ln": layer.self_attn_layer_norm}, inputs=False) as ln_out, \
            capture({"attn": layer.self_attn}, outputs=False, input_key="query") as attn_in, torch.no_grad():
        io = layer_io(model.encoder.layers, lambda: model(src, lengths, prev))
    torch.testing.assert_close(attn_in.inputs["attn"], ln_out.outputs["ln"])
    assert not is_normalized(io[-1][1])  # layer outputs are raw residual streams
    assert isinstance(model.encoder.layer_norm, nn.LayerNorm) and isinstance(model.decoder.layer_norm, nn.LayerNorm)
    enc_out = model.encoder(src, src_lengths=lengths)["encoder_out"][0]
    assert is_normalized(enc_out)


@pytest.mark.parametrize("scope", ["all", "ffn-out"])
def test_post_ln_init_shrinks_layer_l_by_n_minus_l_plus_1(tiny_data, scope):
    n = 6
    model, _ = scheme_model(tiny_data, "post-ln-init", "--post-ln-init-scope", scope, n=n, m=2)
    for index, layer in enumerate(model.encoder.layers, start=1):
        k = n - index + 1
        bound_std = math.sqrt(6 / (64 + 128)) / math.sqrt(3)  # xavier_uniform std of fc2 (128 -> 64)
        assert layer.fc2.weight.abs().max().item() <= math.sqrt(6 / 192) / k + 1e-7
        assert layer.fc2.weight.std().item() == pytest.approx(bound_std / k, rel=0.08)
        q_max = layer.self_attn.q_proj.weight.abs().max().item()
        default_bound = math.sqrt(6 / 128) / math.sqrt(2)  # fairseq's q init: xavier_uniform gain 1/sqrt(2)
        if scope == "all":
            assert q_max <= default_bound / k + 1e-7
        else:
            assert q_max > default_bound * 0.9


@pytest.mark.parametrize("exponent", ["0.5", "0.25"])
def test_ds_init_bound_per_depth(tiny_data, exponent):
    n = 6
    model, _ = scheme_model(tiny_data, "ds-init", "--ds-init-exponent", exponent, "--ds-init-alpha", "0.8", n=n)
    for index, layer in enumerate(model.encoder.layers, start=1):
        for module in (layer.fc1, layer.self_attn.v_proj):
            fan_out, fan_in = module.weight.shape
            bound = math.sqrt(6 / (fan_in + fan_out)) * 0.8 / index ** float(exponent)
            assert module.weight.abs().max().item() <= bound + 1e-7
            assert module.weight.abs().max().item() > 0.95 * bound  # uniform fills its range
            assert torch.count_nonzero(module.bias) == 0


def _sublayer_inputs_and_branches(stack, run_forward, cross: bool):
    """[(x_i, G_i(x_i))] for every sub-layer of ``stack`` in forward order (x_i: the residual input)."""
    return [(x, g) for layer in residual_io(stack.layers, run_forward, cross) for x, g, _ in layer]


def test_admin_profiled_ratios_equal_accumulated_variances(tiny_data):
    """w_1 = 1 and w_{i+1} = sqrt(Var[x_i * w_i] + Var[G_i(x_i)]) per stack, on the profiling batch."""
    model, task = scheme_model(tiny_data, "admin")
    src, lengths, prev = sample_batch(task)
    model.train()
    model(src, lengths, prev)  # first training batch: profiles, then trains on it
    assert all(bool(layer.admin_profiled) for layer in model.modules() if hasattr(layer, "admin_profiled"))
    model.eval()  # dropout is 0: the same computation as the profiling pass
    for stack, cross in ((model.encoder, False), (model.decoder, True)):
        names = ("self_attn", "encoder_attn", "ffn") if cross else ("self_attn", "ffn")
        omegas = [getattr(layer, f"admin_omega_{name}").detach().clone() for layer in stack.layers for name in names]
        with torch.no_grad():
            pairs = _sublayer_inputs_and_branches(stack, lambda: model(src, lengths, prev), cross)
        ratio = 1.0
        for omega, (x, g) in zip(omegas, pairs, strict=True):
            torch.testing.assert_close(omega, torch.full_like(omega, ratio), rtol=1e-4, atol=1e-6)
            ratio = math.sqrt((x * omega).var(unbiased=False).item() + g.var(unbiased=False).item())
        assert omegas[-1][0].item() > 1.0
    before = model.encoder.layers[-1].admin_omega_ffn.detach().clone()
    model.train()
    model(src, lengths, prev)  # second batch: no re-profiling
    assert torch.equal(before, model.encoder.layers[-1].admin_omega_ffn.detach())


def test_admin_closed_form_omega(tiny_data):
    model, task = scheme_model(tiny_data, "admin-closed")
    src, lengths, prev = sample_batch(task)

    def omega(n):
        return math.sqrt((n + 1) / math.log(n + 1) - 1)

    with torch.no_grad():
        check_ln_inputs(model.encoder.layers, lambda: model(src, lengths, prev), omega(2 * N), {"self"})
        check_ln_inputs(model.decoder.layers, lambda: model(src, lengths, prev), omega(3 * M), {"self", "cross"})
    assert omega(12) == pytest.approx(2.02, abs=0.01)  # admin-torch's README example


@pytest.mark.parametrize("name", ["rezero", "r-fixup"])
def test_zero_branch_schemes_start_as_identity_without_layernorm(tiny_data, name):
    model, task = scheme_model(tiny_data, name)
    src, lengths, prev = sample_batch(task)
    for stack in (model.encoder, model.decoder):
        assert all(count_layer_norms(layer) == 0 for layer in stack.layers)
    with torch.no_grad():
        for layers in (model.encoder.layers, model.decoder.layers):
            for x_in, x_out in layer_io(layers, lambda: model(src, lengths, prev)):
                torch.testing.assert_close(x_out, x_in)
    if name == "rezero":
        assert all(layer.rezero_weight.item() == 0 for layer in model.encoder.layers)
    else:
        layer = model.encoder.layers[0]
        assert torch.count_nonzero(layer.fc2.weight) == 0 and torch.count_nonzero(layer.self_attn.out_proj.weight) == 0
        num_branches = 2 * N + 3 * M
        assert layer.fc1.weight.std().item() == pytest.approx(
            XAVIER_UNIFORM_STD[1] * num_branches ** -0.5, rel=0.1)
        assert not layer.fc1.bias.requires_grad


def test_t_fixup_scales_and_no_layernorm(tiny_data):
    n, m = 6, 6
    model, _ = scheme_model(tiny_data, "t-fixup", n=n, m=m)
    assert count_layer_norms(model.encoder) == 0 and count_layer_norms(model.decoder) == 0
    enc, dec = 0.67 * n ** -0.25, (9 * m) ** -0.25
    for layers, scale in ((model.encoder.layers, enc), (model.decoder.layers, dec)):
        assert pooled_std(layers, "fc1") == pytest.approx(XAVIER_UNIFORM_STD[1] * scale, rel=0.05)
        assert pooled_std(layers, "self_attn.out_proj") == pytest.approx(XAVIER_UNIFORM_STD[0] * scale, rel=0.05)
        # fairseq's v init has gain 1/sqrt(2), which T-Fixup's sqrt(2) undoes
        assert pooled_std(layers, "self_attn.v_proj") == pytest.approx(XAVIER_UNIFORM_STD[0] * scale, rel=0.05)
    emb = model.encoder.embed_tokens.weight[4:]
    assert emb.std().item() == pytest.approx(64 ** -0.5 * (9 * n) ** -0.25, rel=0.1)


def test_dlcl_weights_are_lower_triangular_average_and_combine_history(tiny_data):
    model, task = scheme_model(tiny_data, "dlcl")
    weights = model.encoder.dlcl_weights.detach()
    assert weights.shape == (N + 1, N + 1)
    for row in range(N + 1):
        assert torch.allclose(weights[row, : row + 1], torch.full((row + 1,), 1 / (row + 1)))
        assert torch.count_nonzero(weights[row, row + 1:]) == 0
    src, lengths, prev = sample_batch(task)
    # after DLCL's hook: already combined (= LN_0(y0))
    with capture({"layer0": model.encoder.layers[0]}, outputs=False) as embedded, torch.no_grad():
        io = layer_io(model.encoder.layers, lambda: model(src, lengths, prev))
    ln = nn.functional.layer_norm
    y = [io[0][0], io[0][1], io[1][1]]  # LN_0(y0) is what layer 1 received; y1, y2 raw outputs
    expected_layer3_in = (y[0] + ln(y[1], (64,)) + ln(y[2], (64,))) / 3
    torch.testing.assert_close(io[2][0], expected_layer3_in, rtol=1e-5, atol=1e-5)
    assert is_normalized(embedded.inputs["layer0"])


@pytest.mark.parametrize("name", ["normformer", "sub-ln", "sandwich-ln"])
def test_inner_normalization_schemes(tiny_data, name):
    model, task = scheme_model(tiny_data, name)
    src, lengths, prev = sample_batch(task)
    layer = model.decoder.layers[1]
    with capture({"fc2": layer.fc2, "out_proj": layer.self_attn.out_proj}, outputs=False) as received, \
            capture({"fc2": layer.fc2, "attn": layer.self_attn}, inputs=False) as returned, torch.no_grad():
        model(src, lengths, prev)
    assert model.encoder.layer_norm is not None and model.decoder.layer_norm is not None  # Pre-LN family
    if name == "normformer":
        assert is_normalized(received.inputs["fc2"]) and is_normalized(returned.outputs["attn"])
        assert torch.equal(layer.normformer_head_scale.weight, torch.ones(2))
        assert hasattr(model.encoder.layers[0], "normformer_attn_ln")
    elif name == "sub-ln":
        assert is_normalized(received.inputs["fc2"]) and is_normalized(received.inputs["out_proj"])
        gamma = math.sqrt(math.log(3 * M))
        assert pooled_std(model.decoder.layers, "fc1") == pytest.approx(XAVIER_UNIFORM_STD[1] * gamma, rel=0.1)
    else:
        assert is_normalized(returned.outputs["fc2"]) and is_normalized(returned.outputs["attn"])
        assert pooled_std(model.decoder.layers, "fc2") == pytest.approx(0.02 / math.sqrt(2 * M), rel=0.1)


def test_normformer_head_scale_positions_differ(tiny_data):
    paper, task = scheme_model(tiny_data, "normformer")
    fairseq_pos, _ = scheme_model(tiny_data, "normformer", "--normformer-head-scale-position", "fairseq")
    fairseq_pos.load_state_dict(paper.state_dict())
    for model in (paper, fairseq_pos):
        for layer in model.encoder.layers:
            layer.normformer_head_scale.weight.data = torch.tensor([0.5, 2.0])
    src, lengths, prev = sample_batch(task)
    with torch.no_grad():
        assert not torch.allclose(paper(src, lengths, prev)[0], fairseq_pos(src, lengths, prev)[0])


@pytest.mark.parametrize(
    "name,param",
    [("r-fixup", "rfixup_self_attn_bias_out"), ("normformer", "normformer_head_scale"), ("sub-ln", "sub_ln_attn")],
)
def test_hooks_follow_deepcopy_for_ema(tiny_data, name, param):
    """fairseq's EMA deep-copies the model: the copy's hooks must use the copy's parameters."""
    model, task = scheme_model(tiny_data, name)
    src, lengths, prev = sample_batch(task)
    clone = copy.deepcopy(model)
    extra = getattr(model.decoder.layers[0], param)
    params = list(extra.parameters()) if isinstance(extra, nn.Module) else [extra]
    with torch.no_grad():
        before = clone(src, lengths, prev)[0]
        for p in params:
            p.add_(3.0)
        assert torch.equal(clone(src, lengths, prev)[0], before)
        assert not torch.allclose(model(src, lengths, prev)[0], before)


@pytest.mark.parametrize(
    "flags,needle",
    [
        (("--residual-scheme", "admin", "--encoder-normalize-before"), "admin is a Post-LN method"),
        (("--residual-scheme", "t-fixup", "--layernorm-embedding"), "--layernorm-embedding"),
        (("--residual-scheme", "rezero", "--decoder-normalize-before"), "--decoder-normalize-before"),
        (("--residual-scheme", "rezero", "--fp16"), "--allow-rezero-fp16"),
        (("--residual-scheme", "admin", "--deepnorm"), "--deepnorm contradicts --residual-scheme admin"),
        (("--residual-scheme", "pre-ln", "--ds-init-alpha", "0.5"), "--ds-init-alpha only applies"),
        (("--residual-scheme", "ds-init", "--ds-init-exponent", "0.3"), "--ds-init-exponent"),
        (("--residual-scheme", "dlcl", "--dlcl-history-window", "0"), "--dlcl-history-window"),
    ],
)
def test_scheme_constraints_are_refused(tiny_data, flags, needle):
    with pytest.raises(DeepNetConfigError, match=needle):
        build(tiny_data, "--encoder-layers", 2, "--decoder-layers", 2, *flags)


def test_unknown_scheme_is_refused_by_the_parser(tiny_data, capsys):
    with pytest.raises(SystemExit):
        build(tiny_data, "--residual-scheme", "magic")
    assert "--residual-scheme" in capsys.readouterr().err


@pytest.mark.parametrize("name", SCHEME_NAMES)
def test_scheme_trains_saves_reloads_and_generates(tiny_data, tmp_path, name):
    """fairseq-train and fairseq-generate in this process (their CLIs run as subprocesses elsewhere)."""
    args = train_args(tiny_data, tmp_path, "--residual-scheme", name, "--max-update", "20", "--lr", "5e-4",
                      "--share-all-embeddings", "--dropout", "0.1", "--disable-validation", "--no-epoch-checkpoints")
    args[args.index("--encoder-layers") + 1] = "6"  # 6L-6L
    args[args.index("--decoder-layers") + 1] = "6"
    _, log = fairseq_main("train", args[1:])
    losses = logged_updates(log)
    assert sorted(losses) == list(range(1, 21)), name
    assert all(math.isfinite(v) for v in losses.values()), losses
    print(f"\n{name}: loss after 20 updates = {losses[20]:.3f}")
    gen = generate_in_process([tiny_data, "--user-dir", USER_DIR, "--path", tmp_path / "checkpoint_last.pt", "--cpu",
                               "--beam", "2", "--max-len-b", "12", "--batch-size", "16"], tmp_path / "gen")
    assert sum(line.startswith("H-") for line in gen.splitlines()) >= 10
    assert f"{name}" in log
