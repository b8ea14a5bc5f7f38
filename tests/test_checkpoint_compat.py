"""What a checkpoint computes is kept: scheme state survives every state-dict consumer (EMA, fp16
casting, averaging), and a checkpoint is refused by a model with another residual scheme or other
constants (resume, fine-tune, --model-overrides, LayerDrop pruning, averaging)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.dataclass.configs import EMAConfig
from fairseq.models.ema import EMA

import deepnet_fairseq  # noqa: F401
from conftest import causes, train_args
from deepnet_fairseq.checkpoints import average_checkpoints, average_state_dicts, load_checkpoint
from deepnet_fairseq.cli.average_checkpoints import main as average_main
from deepnet_fairseq.scheme_record import SchemeMismatchError
from deepnet_fairseq.schemes import SCHEME_NAMES
from modelkit import build, sample_batch

pytestmark = pytest.mark.xdist_group("test_checkpoint_compat")

STOCK_TINY = ("--encoder-embed-dim", "64", "--decoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128",
              "--decoder-ffn-embed-dim", "128", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2")


def train_in_process(argv, monkeypatch) -> None:
    """fairseq-train's ``cli_main`` in this process (no import cost); raises what training raises."""
    from fairseq_cli import train

    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", ["fairseq-train", *map(str, argv)])
        train.cli_main()


# ---------------------------------------------------------------------------------------------------
# 1. every scheme's state is floating-point data that EMA, fp16 casting and averaging can consume


def _trained_once(tiny_data, scheme):
    model, task = build(tiny_data, "--residual-scheme", scheme, "--encoder-layers", 2, "--decoder-layers", 2)
    src, lengths, prev = sample_batch(task)
    model.train()
    model(src, lengths, prev)[0].float().logsumexp(-1).mean().backward()  # Admin profiles here
    model.eval()
    return model, task, (src, lengths, prev)


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_scheme_state_survives_ema_fp16_and_averaging(tiny_data, scheme):
    model, task, batch = _trained_once(tiny_data, scheme)
    state = model.state_dict()
    non_float = [k for k, v in state.items() if not (torch.is_tensor(v) and v.is_floating_point())]
    assert non_float == [], f"{scheme}: non-floating state {non_float} breaks EMA/averaging/fp16 casting"

    for fp32 in (False, True):
        ema = EMA(model, EMAConfig(ema_decay=0.9, ema_fp32=fp32))
        before = {k: v.clone() for k, v in ema.get_model().state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3)
        ema.step(model)
        name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
        expected = 0.9 * before[name] + 0.1 * param.detach()
        torch.testing.assert_close(ema.get_model().state_dict()[name], expected)

    expected_out = model(*batch)[0]
    # --fp16 casts the model with .half(): every entry must round-trip and load into a fresh model
    half = {k: v.half() for k, v in model.state_dict().items()}
    fresh, _ = build(tiny_data, "--residual-scheme", scheme, "--encoder-layers", 2, "--decoder-layers", 2)
    fresh.load_state_dict(half, strict=True)
    assert all(v.dtype == torch.float32 for v in fresh.state_dict().values())
    torch.testing.assert_close(fresh(*batch)[0], expected_out, atol=0.05, rtol=0.05)

    averaged = average_state_dicts([model.state_dict(), model.state_dict()])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(averaged[key], value)


def test_admin_trains_with_ema_in_fairseq_train(tiny_data, tmp_path, monkeypatch):
    save = tmp_path / "admin_ema"
    train_in_process(train_args(tiny_data, save, "--residual-scheme", "admin", "--ema-decay", "0.9", "--store-ema",
                                "--ema-fp32", "--max-update", "2", "--disable-validation")[1:], monkeypatch)
    state = load_checkpoint(save / "checkpoint_last.pt")
    assert state["optimizer_history"][-1]["num_updates"] == 2
    ema_state = state["extra_state"]["ema"]
    assert float(ema_state["decoder.layers.0.admin_profiled"]) == 1.0
    assert all(torch.isfinite(v).all() for v in ema_state.values())


# ---------------------------------------------------------------------------------------------------
# 3./4. the residual scheme a checkpoint was trained with is checked wherever it is loaded


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """Checkpoints of a DeepNorm 2L-2L run and of stock fairseq ``transformer`` (same sizes)."""
    root = tmp_path_factory.mktemp("compat")
    monkeypatch = pytest.MonkeyPatch()
    try:
        train_in_process(train_args(tiny_data, root / "deepnorm", "--deepnorm", "--max-update", "2",
                                    "--disable-validation", "--no-epoch-checkpoints")[1:], monkeypatch)
        train_in_process(train_args(tiny_data, root / "stock", "--max-update", "2", "--disable-validation",
                                    "--no-epoch-checkpoints", *STOCK_TINY, arch="transformer")[1:], monkeypatch)
    finally:
        monkeypatch.undo()
    # a deepnet_transformer Post-LN checkpoint is the stock network under the plugin's architecture name
    state = load_checkpoint(root / "stock" / "checkpoint_last.pt")
    state["cfg"]["model"].arch = "deepnet_transformer_tiny"
    (root / "postln").mkdir()
    torch.save(state, root / "postln" / "checkpoint_last.pt")
    return root


def _resume(trained, tiny_data, tmp_path, monkeypatch, *flags, arch="deepnet_transformer_tiny"):
    save = tmp_path / "resume"
    shutil.copytree(trained / "deepnorm", save)
    train_in_process(train_args(tiny_data, save, "--max-update", "3", "--disable-validation", *flags,
                                arch=arch)[1:], monkeypatch)
    return save


@pytest.mark.parametrize(
    "flags, needle",
    [
        ((), "this model is built with encoder post-ln, decoder post-ln"),
        (("--deepnorm", "--deepnorm-alpha", "3.0"), "this model is built with encoder deepnorm(alpha=3;"),
        (("--residual-scheme", "admin-closed"), "this model is built with encoder admin-closed(omega="),
    ],
)
def test_resume_with_another_scheme_is_refused_naming_both(trained, tiny_data, tmp_path, monkeypatch, flags, needle):
    with pytest.raises(Exception) as info:
        _resume(trained, tiny_data, tmp_path, monkeypatch, *flags)
    text = causes(info.value)
    assert "SchemeMismatchError" in text
    assert "trained with encoder deepnorm(alpha=1.0059; init beta=0.700563, init=paper)" in text
    assert needle in text and "--allow-residual-scheme-change" in text


def test_allow_flag_loads_another_scheme_with_a_warning(trained, tiny_data, tmp_path, monkeypatch, caplog):
    save = _resume(trained, tiny_data, tmp_path, monkeypatch, "--allow-residual-scheme-change")
    assert load_checkpoint(save / "checkpoint_last.pt")["optimizer_history"][-1]["num_updates"] == 3
    assert any("allowed by --allow-residual-scheme-change" in r.getMessage() for r in caplog.records)


def test_same_scheme_resumes(trained, tiny_data, tmp_path, monkeypatch):
    save = _resume(trained, tiny_data, tmp_path, monkeypatch, "--deepnorm")
    assert load_checkpoint(save / "checkpoint_last.pt")["optimizer_history"][-1]["num_updates"] == 3


def test_finetune_deepnorm_into_stock_transformer_is_refused(trained, tiny_data, tmp_path, monkeypatch):
    with pytest.raises(Exception) as info:
        train_in_process(train_args(tiny_data, tmp_path / "ft", "--finetune-from-model",
                                    trained / "deepnorm" / "checkpoint_last.pt", "--max-update", "1",
                                    "--disable-validation", *STOCK_TINY, arch="transformer")[1:], monkeypatch)
    text = causes(info.value)
    assert "trained with encoder deepnorm(" in text and "fairseq's own TransformerModel cannot compute" in text


def test_stock_transformer_and_plain_deepnet_transformer_load_each_other(trained, tiny_data):
    stock_model, _ = build(tiny_data, *STOCK_TINY, "--encoder-layers", 2, "--decoder-layers", 2, arch="transformer")
    plain_model, _ = build(tiny_data, "--encoder-layers", 2, "--decoder-layers", 2)
    for path, model in ((trained / "stock" / "checkpoint_last.pt", plain_model),
                        (trained / "postln" / "checkpoint_last.pt", stock_model)):
        state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
        model.load_state_dict(state["model"], strict=True, model_cfg=state["cfg"].model)


def test_model_overrides_that_change_the_scheme_are_refused(trained, tiny_data):
    path = str(trained / "deepnorm" / "checkpoint_last.pt")
    changes = ({"deepnorm": False}, {"deepnorm_alpha": "2.5"}, {"deepnorm": False, "residual_scheme": "post-ln-init"},
               {"encoder_layers": 6, "encoder_layers_to_keep": "0,1"})
    for overrides in changes:
        with pytest.raises(SchemeMismatchError, match="trained with encoder deepnorm"):
            checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": str(tiny_data), **overrides})
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task(
        [path], arg_overrides={"data": str(tiny_data), "deepnorm": False, "allow_residual_scheme_change": True})
    assert models[0].decoder.scheme.name == "post-ln"


def test_layers_to_keep_keeps_the_trained_constants(trained, tiny_data):
    path = str(trained / "deepnorm" / "checkpoint_last.pt")
    full, _, _ = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": str(tiny_data)})
    pruned, _, _ = checkpoint_utils.load_model_ensemble_and_task(
        [path], arg_overrides={"data": str(tiny_data), "decoder_layers_to_keep": "1", "encoder_layers_to_keep": "0"})
    assert len(pruned[0].decoder.layers) == 1 and len(pruned[0].encoder.layers) == 1
    for side in ("encoder", "decoder"):
        trained_scheme, kept_scheme = getattr(full[0], side).scheme, getattr(pruned[0], side).scheme
        assert kept_scheme.alpha == trained_scheme.alpha and kept_scheme.beta == trained_scheme.beta
    # the kept layer is the trained layer: same weights, same constants, so the same sub-layer output
    torch.testing.assert_close(pruned[0].decoder.layers[0].fc1.weight, full[0].decoder.layers[1].fc1.weight)


@pytest.mark.parametrize("other, needle", [("stock", "is --arch deepnet_transformer_tiny but"),
                                           ("postln", "cannot average networks that compute different functions")])
def test_averaging_refuses_different_networks(trained, tmp_path, capsys, other, needle):
    inputs = [trained / "deepnorm" / "checkpoint_last.pt", trained / other / "checkpoint_last.pt"]
    with pytest.raises(SchemeMismatchError, match=needle.replace("(", r"\(")):
        average_checkpoints(inputs, tmp_path / "avg.pt")
    assert average_main(["--inputs", *map(str, inputs), "--output", str(tmp_path / "avg.pt")]) == 1
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "avg.pt").exists()


def test_averaging_same_network_still_works(trained, tmp_path):
    path = trained / "deepnorm" / "checkpoint_last.pt"
    copy = tmp_path / "copy.pt"
    shutil.copy(path, copy)
    result = average_checkpoints([path, copy], tmp_path / "avg.pt")
    assert Path(tmp_path / "avg.pt").exists() and result["model"].keys() == load_checkpoint(path)["model"].keys()


def test_loaded_state_dict_holds_only_weights(trained):
    state = checkpoint_utils.load_checkpoint_to_cpu(str(trained / "deepnorm" / "checkpoint_last.pt"))
    assert all(torch.is_tensor(v) for v in state["model"].values())
    assert sum(v.numel() for v in state["model"].values()) > 0


@pytest.mark.parametrize("flags", [("--deepnorm", "--deepnorm-beta", "0.5"),
                                   ("--deepnorm", "--deepnorm-init", "torchscale")])
def test_init_only_settings_do_not_block_a_resume(trained, tiny_data, tmp_path, monkeypatch, flags):
    save = _resume(trained, tiny_data, tmp_path, monkeypatch, *flags)
    assert load_checkpoint(save / "checkpoint_last.pt")["optimizer_history"][-1]["num_updates"] == 3


def test_init_variants_of_post_ln_load_stock_checkpoints(trained, tiny_data):
    for scheme in ("post-ln-init", "ds-init"):
        model, _ = build(tiny_data, "--residual-scheme", scheme, "--encoder-layers", 2, "--decoder-layers", 2)
        state = checkpoint_utils.load_checkpoint_to_cpu(str(trained / "stock" / "checkpoint_last.pt"))
        model.load_state_dict(state["model"], strict=True, model_cfg=state["cfg"].model)


def test_allow_flag_is_not_stored_for_later_loads(trained, tiny_data, tmp_path, monkeypatch):
    save = _resume(trained, tiny_data, tmp_path, monkeypatch, "--deepnorm", "--deepnorm-alpha", "1.2",
                   "--allow-residual-scheme-change")
    assert load_checkpoint(save / "checkpoint_last.pt")["cfg"]["model"].allow_residual_scheme_change
    with pytest.raises(SchemeMismatchError, match=r"trained with encoder deepnorm\(alpha=1.2;"):
        checkpoint_utils.load_model_ensemble_and_task(
            [str(save / "checkpoint_last.pt")], arg_overrides={"data": str(tiny_data), "deepnorm_alpha": "1.0"})


def test_override_that_breaks_the_stored_config_is_not_called_corrupt(trained, tiny_data):
    from deepnet_fairseq.schemes import DeepNetConfigError

    with pytest.raises(DeepNetConfigError) as info:
        checkpoint_utils.load_model_ensemble_and_task([str(trained / "deepnorm" / "checkpoint_last.pt")],
                                                      arg_overrides={"data": str(tiny_data),
                                                                     "encoder_normalize_before": True})
    assert "--encoder-normalize-before" in str(info.value) and "corrupt" not in causes(info.value)


def test_stock_model_refuses_a_checkpoint_with_the_other_layer_norm_placement(trained, tiny_data):
    import argparse

    from deepnet_fairseq.scheme_record import check_loaded_record, record_from_model_config

    pre_ln_model, _ = build(tiny_data, *STOCK_TINY, "--encoder-layers", 2, "--decoder-layers", 2,
                            "--encoder-normalize-before", "--decoder-normalize-before", arch="transformer")
    postln_cfg = load_checkpoint(trained / "postln" / "checkpoint_last.pt")["cfg"]["model"]
    deepnet_post_ln = record_from_model_config(postln_cfg)
    with pytest.raises(SchemeMismatchError, match="is built with encoder pre-ln, decoder pre-ln"):
        check_loaded_record(pre_ln_model, deepnet_post_ln, None)
    check_loaded_record(pre_ln_model, deepnet_post_ln, argparse.Namespace(allow_residual_scheme_change=True))
    # a stock checkpoint's stored configuration may lack its architecture's defaults: left to fairseq
    stock_post_ln = record_from_model_config(load_checkpoint(trained / "stock" / "checkpoint_last.pt")["cfg"]["model"])
    check_loaded_record(pre_ln_model, stock_post_ln, None)


def test_averaging_dataclass_model_configs_stored_as_dicts(trained, tmp_path):
    """deepnet_lm/transformer_lm checkpoints store cfg.model as a plain dict (fairseq's to_container)."""
    state = load_checkpoint(trained / "deepnorm" / "checkpoint_last.pt")
    lm_cfg = {"_name": "deepnet_lm", "decoder_layers": 2, "deepnorm": True}
    paths = []
    for name, cfg in (("a", lm_cfg), ("b", lm_cfg), ("c", {**lm_cfg, "deepnorm": False})):
        state["cfg"]["model"] = dict(cfg)
        paths.append(tmp_path / f"{name}.pt")
        torch.save(state, paths[-1])
    average_checkpoints(paths[:2], tmp_path / "avg.pt")
    with pytest.raises(SchemeMismatchError, match="decoder deepnorm.*but .*c.pt with decoder post-ln"):
        average_checkpoints([paths[0], paths[2]], tmp_path / "avg2.pt")


def test_record_survives_fairseq_broadcast_of_the_state_to_every_rank(trained, tiny_data):
    """Multi-GPU resume: rank 0 loads, then fairseq's broadcast_object rebuilds the state as plain dicts."""
    import socket

    from fairseq.distributed import utils as distributed_utils

    from deepnet_fairseq.scheme_record import RECORD_ATTRIBUTE

    state = checkpoint_utils.load_checkpoint_to_cpu(str(trained / "deepnorm" / "checkpoint_last.pt"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        received = distributed_utils.broadcast_object(state, src_rank=0, group=distributed_utils.get_global_group())
    finally:
        torch.distributed.destroy_process_group()
    assert getattr(received["model"], RECORD_ATTRIBUTE)["decoder"]["alpha"] == pytest.approx(1.5650845800732873)
    plain, _ = build(tiny_data, "--encoder-layers", 2, "--decoder-layers", 2)
    with pytest.raises(SchemeMismatchError):
        plain.load_state_dict(received["model"], strict=True, model_cfg=None)


def test_averaging_checkpoints_without_a_stored_config(tmp_path):
    paths = []
    for name in ("a", "b"):
        paths.append(tmp_path / f"{name}.pt")
        torch.save({"model": {"w": torch.ones(2)}}, paths[-1])
    result = average_checkpoints(paths, tmp_path / "avg.pt")
    torch.testing.assert_close(result["model"]["w"], torch.ones(2))


def test_overrides_of_an_args_era_checkpoint_are_applied_as_fairseq_does(tiny_data, tmp_path):
    """Checkpoints from before fairseq 0.10 store ``args``: fairseq applies --model-overrides to them
    before upgrading them to ``cfg`` (``max_positions`` becomes ``max_source_positions`` there)."""
    from fairseq import options

    parser = options.get_training_parser(default_task="translation")
    args = options.parse_args_and_arch(parser, [str(tiny_data), "--arch", "transformer", "--cpu"])
    path = tmp_path / "args_era.pt"
    torch.save({"args": args, "model": {"w": torch.zeros(1)}, "extra_state": {"train_iterator": {"epoch": 1}},
                "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam",
                                       "lr_scheduler_state": {"best": 0.0}, "num_updates": 1}],
                "last_optimizer_state": None}, path)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path), {"max_positions": 77})
    assert state["cfg"]["task"].max_source_positions == 77
