"""deepnet_transformer / deepnet_lm built the way fairseq builds them, measured with hooks.

Each test states the equation it checks; constants are computed here from the paper's formulas,
never read back from the code.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

import deepnet_fairseq  # noqa: F401
from conftest import USER_DIR, cli, fairseq_main, generate_in_process, logged_updates, run, train_args
from deepnet_fairseq.models.options import DeepNetConfigError
from modelkit import build, check_ln_inputs, paper_constants, pooled_std, sample_batch, xavier_std

# module-scoped training fixtures: keep this file on one xdist worker
pytestmark = pytest.mark.xdist_group("test_deepnet_model")


@pytest.mark.parametrize("n,m", [(3, 2), (2, 5)])
def test_ln_input_is_alpha_x_plus_branch_on_every_sublayer(tiny_data, n, m):
    model, task = build(tiny_data, "--deepnorm", "--encoder-layers", n, "--decoder-layers", m)
    src, lengths, prev = sample_batch(task)
    const = paper_constants(n, m)
    with torch.no_grad():
        enc = check_ln_inputs(model.encoder.layers, lambda: model(src, lengths, prev), const["encoder"][0], {"self"})
        dec = check_ln_inputs(model.decoder.layers, lambda: model(src, lengths, prev), const["decoder"][0],
                              {"self", "cross"})
    assert enc == 2 * n and dec == 3 * m
    assert model.encoder.layer_norm is None and model.decoder.layer_norm is None  # no final LayerNorm


def test_without_deepnorm_alpha_is_one(tiny_data):
    model, task = build(tiny_data, "--encoder-layers", 2, "--decoder-layers", 2)
    src, lengths, prev = sample_batch(task)
    with torch.no_grad():
        check_ln_inputs(model.decoder.layers, lambda: model(src, lengths, prev), 1.0, {"self", "cross"})


def test_alpha_beta_overrides(tiny_data):
    model, task = build(tiny_data, "--deepnorm", "--encoder-layers", 2, "--decoder-layers", 2,
                        "--deepnorm-alpha", "2.5,1.5", "--deepnorm-beta", "0.3")
    src, lengths, prev = sample_batch(task)
    with torch.no_grad():
        check_ln_inputs(model.encoder.layers, lambda: model(src, lengths, prev), 2.5, {"self"})
        check_ln_inputs(model.decoder.layers, lambda: model(src, lengths, prev), 1.5, {"self", "cross"})
    w = torch.cat([layer.fc1.weight.flatten() for layer in model.decoder.layers])
    assert w.std().item() == pytest.approx(0.3 * math.sqrt(2 / (64 + 128)), rel=0.05)


def test_paper_init_std_and_zero_biases(tiny_data):
    n, m = 6, 6
    model, _ = build(tiny_data, "--deepnorm", "--encoder-layers", n, "--decoder-layers", m,
                     "--encoder-embed-dim", 128, "--decoder-embed-dim", 128,
                     "--encoder-ffn-embed-dim", 256, "--decoder-ffn-embed-dim", 256)
    const = paper_constants(n, m)
    sides = {
        "encoder": (model.encoder.layers, ["self_attn"]),
        "decoder": (model.decoder.layers, ["self_attn", "encoder_attn"]),
    }
    for side, (layers, attns) in sides.items():
        beta = const[side][1]
        names = ["fc1", "fc2"] + [f"{a}.{p}" for a in attns for p in ("v_proj", "out_proj")]
        for name in names:
            expected = xavier_std(layers[0].get_submodule(name), beta)
            assert pooled_std(layers, name) == pytest.approx(expected, rel=0.03), (side, name)
        for name in [f"{a}.{p}" for a in attns for p in ("q_proj", "k_proj")]:
            assert pooled_std(layers, name) == pytest.approx(xavier_std(layers[0].get_submodule(name)), rel=0.03)
        for layer in layers:
            for name in names + [f"{a}.{p}" for a in attns for p in ("q_proj", "k_proj")]:
                assert torch.count_nonzero(layer.get_submodule(name).bias) == 0, (side, name)


def test_torchscale_init_variant(tiny_data):
    n, m = 6, 6
    model, _ = build(tiny_data, "--deepnorm", "--deepnorm-init", "torchscale", "--encoder-layers", n,
                     "--decoder-layers", m, "--encoder-embed-dim", 128, "--decoder-embed-dim", 128,
                     "--encoder-ffn-embed-dim", 256, "--decoder-ffn-embed-dim", 256)
    enc_beta = 1.15 * (n**4 * m) ** (-1 / 16)  # torchscale's constant, not the paper's 0.87
    dec_beta = (12 * m) ** -0.25
    for layers, beta in ((model.encoder.layers, enc_beta), (model.decoder.layers, dec_beta)):
        fc1 = layers[0].fc1
        default_std = 1 / math.sqrt(3 * fc1.in_features)  # kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
        assert pooled_std(layers, "fc1") == pytest.approx(beta * default_std, rel=0.03)
        assert pooled_std(layers, "self_attn.q_proj") == pytest.approx(1 / math.sqrt(3 * 128), rel=0.03)
        biases = torch.cat([layer.fc1.bias.detach() for layer in layers])
        assert biases.abs().max().item() > 0
        assert biases.abs().max().item() <= beta / math.sqrt(fc1.in_features) + 1e-6


def test_plain_deepnet_transformer_is_bit_identical_to_fairseq_transformer(tiny_data):
    stock, task = build(tiny_data, "--encoder-layers", 3, "--decoder-layers", 3, "--share-all-embeddings",
                        arch="transformer_tiny")
    ours, _ = build(tiny_data, "--encoder-layers", 3, "--decoder-layers", 3, "--share-all-embeddings",
                    "--encoder-ffn-embed-dim", 64, "--decoder-ffn-embed-dim", 64)
    assert type(stock).__name__ == "TransformerModel"
    torch.manual_seed(1)
    for p in stock.parameters():  # make sure nothing matches by accident of a shared seed
        p.data.normal_(0, 0.1)
    ours.load_state_dict(stock.state_dict(), strict=True)
    src, lengths, prev = sample_batch(task)
    with torch.no_grad():
        a, _ = stock(src, lengths, prev)
        b, _ = ours(src, lengths, prev)
    assert torch.equal(a, b)


def test_checkpoint_activations_same_outputs_and_init(tiny_data):
    plain, task = build(tiny_data, "--deepnorm", "--encoder-layers", 2, "--decoder-layers", 2)
    ckpt, _ = build(tiny_data, "--deepnorm", "--encoder-layers", 2, "--decoder-layers", 2, "--checkpoint-activations")
    assert plain.state_dict().keys() == ckpt.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, ckpt.state_dict()[key]), key  # same seed, same init inside construction
    src, lengths, prev = sample_batch(task)
    ckpt.train()
    plain.train()
    torch.manual_seed(3)
    loss_a = plain(src, lengths, prev)[0].float().logsumexp(-1).mean()
    torch.manual_seed(3)
    loss_b = ckpt(src, lengths, prev)[0].float().logsumexp(-1).mean()
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b)
    ga = plain.encoder.layers[0].fc1.weight.grad
    gb = ckpt.encoder.layers[0].fc1.weight.grad
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "flags,needle",
    [
        (("--deepnorm", "--encoder-normalize-before"), "--encoder-normalize-before"),
        (("--deepnorm", "--decoder-normalize-before"), "--decoder-normalize-before"),
        (("--deepnorm-alpha", "2"), "--deepnorm-alpha only applies with --residual-scheme deepnorm"),
        (("--deepnorm", "--deepnorm-beta", "-1"), "--deepnorm-beta"),
        (("--deepnorm", "--deepnorm-alpha", "1,2,3"), "--deepnorm-alpha"),
        (("--deepnorm", "--deepnorm-alpha", "abc"), "--deepnorm-alpha"),
        (("--encoder-layers", "0"), "--encoder-layers"),
    ],
)
def test_contradictory_flags_are_refused(tiny_data, flags, needle):
    with pytest.raises(DeepNetConfigError, match=needle):
        build(tiny_data, *flags)


def test_contradictory_flag_error_at_fairseq_train_startup(tiny_data, tmp_path):
    """fairseq-train's cli_main (in this process) stops before training or saving anything."""
    with pytest.raises(DeepNetConfigError, match="--decoder-normalize-before"):
        fairseq_main("train", train_args(tiny_data, tmp_path, "--deepnorm", "--decoder-normalize-before",
                                         "--max-update", "1")[1:])
    assert not list(tmp_path.glob("*.pt"))


@pytest.fixture(scope="module")
def deep_run(tiny_data, tmp_path_factory):
    """30 updates of a 12L-12L model (fairseq-train in this process); returns (save dir, its log)."""
    save = tmp_path_factory.mktemp("deep12")
    args = train_args(tiny_data, save, "--deepnorm", "--encoder-layers", "12", "--decoder-layers", "12",
                      "--share-all-embeddings", "--max-update", "30", "--lr", "5e-4",
                      "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10", "--dropout", "0.0")
    _, log = fairseq_main("train", args[1:])
    return save, log


def test_12l_12l_trains_30_updates_with_decreasing_loss(deep_run):
    _, log = deep_run
    losses = logged_updates(log)
    assert sorted(losses) == list(range(1, 31))
    values = [losses[i] for i in range(1, 31)]
    assert all(math.isfinite(v) for v in values)
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5 - 0.3


def test_12l_12l_generates_and_incremental_equals_full(deep_run, tiny_data, tmp_path):
    save, _ = deep_run
    output = generate_in_process([tiny_data, "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt", "--cpu",
                                  "--beam", "3", "--max-len-b", "12", "--batch-size", "16"], tmp_path / "gen")
    assert sum(line.startswith("H-") for line in output.splitlines()) >= 10

    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(save / "checkpoint_last.pt")], arg_overrides={"data": str(tiny_data)}
    )
    model = models[0].eval()
    src, lengths, prev = sample_batch(task, seed=5)
    with torch.no_grad():
        full = model.get_normalized_probs(model(src, lengths, prev), log_probs=True)
        encoder_out = model.encoder(src, src_lengths=lengths)
        state = {}
        steps = []
        for t in range(prev.size(1)):
            out = model.decoder(prev[:, : t + 1], encoder_out=encoder_out, incremental_state=state)
            steps.append(model.get_normalized_probs(out, log_probs=True))
    incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def lm_data(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    fairseq_main("preprocess", ["--only-source", "--trainpref", tiny_data.parent / "train.src",
                                "--validpref", tiny_data.parent / "valid.src", "--destdir", root, "--workers", "1"])
    return root


def test_deepnet_lm_uses_decoder_only_constants(lm_data):
    m = 4
    model, task = build(lm_data, "--deepnorm", "--decoder-layers", m, "--decoder-embed-dim", 64,
                        "--decoder-ffn-embed-dim", 128, "--decoder-attention-heads", 2,
                        task_name="language_modeling", arch="deepnet_lm")
    tokens = torch.randint(4, len(task.dictionary), (3, 9), generator=torch.Generator().manual_seed(0))
    alpha, beta = (2 * m) ** 0.25, (8 * m) ** -0.25
    with torch.no_grad():
        checked = check_ln_inputs(model.decoder.layers, lambda: model(tokens), alpha, {"self"})
    assert checked == 2 * m
    assert model.decoder.layer_norm is None
    fc2 = model.decoder.layers[0].fc2
    assert pooled_std(model.decoder.layers, "fc2") == pytest.approx(xavier_std(fc2, beta), rel=0.05)


def test_deepnet_lm_trains(lm_data, tmp_path):
    """fairseq-train (in this process) on the language-modeling task."""
    _, log = fairseq_main("train", [lm_data, "--user-dir", USER_DIR, "--task", "language_modeling",
                                    "--arch", "deepnet_lm", "--deepnorm", "--decoder-layers", "4",
                                    "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
                                    "--decoder-attention-heads", "2", "--tokens-per-sample", "32",
                                    "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "512", "--max-update", "10",
                                    "--cpu",
                                    "--no-progress-bar", "--log-format", "json", "--log-interval", "1",
                                    "--save-dir", tmp_path, "--num-workers", "0"])
    losses = logged_updates(log)
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses.values())
    assert "deepnorm(alpha=" in log


def test_hydra_config_in_configs_trains(tiny_data, tmp_path):
    shutil.copy(USER_DIR + "/../configs/deepnet_transformer_tiny.yaml", tmp_path / "c.yaml")
    proc = run([cli("fairseq-hydra-train"), "--config-dir", tmp_path, "--config-name", "c",
                f"task.data={tiny_data}", f"checkpoint.save_dir={tmp_path / 'ck'}", f"common.user_dir={USER_DIR}",
                "optimization.max_update=3", f"hydra.run.dir={tmp_path / 'out'}"])
    assert "deepnorm(alpha=" in proc.stdout + proc.stderr
    assert (tmp_path / "ck" / "checkpoint_last.pt").exists()
