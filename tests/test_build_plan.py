"""One build pass: the residual scheme of a model is resolved, validated and constructed once per model
build, and each scheme owns its options (the plugin's option set and ownership are derived from them)."""

from __future__ import annotations

import argparse
import logging
import shutil
from dataclasses import fields

import pytest

from deepnet_fairseq.models.deepnet_roberta import DeepNetRobertaModel
from deepnet_fairseq.models.deepnet_transformer import DeepNetTransformerModel
from deepnet_fairseq.models.options import OPTION_OWNERS, DeepNetOptions, RunOptions
from deepnet_fairseq.models.plan import plan_model
from deepnet_fairseq.schemes import SCHEMES, DeepNetConfigError, ResidualScheme
from modelkit import build


@pytest.fixture(scope="module")
def mono_data(tiny_data, tmp_path_factory):
    """A data directory with one dictionary (dict.txt): language modeling and masked LM."""
    root = tmp_path_factory.mktemp("mono")
    shutil.copy(tiny_data / "dict.src.txt", root / "dict.txt")
    return root


@pytest.fixture
def constructions(monkeypatch):
    """Counts scheme objects constructed (any scheme class)."""
    count = []
    original = ResidualScheme.__init__

    def counting(self, context):
        count.append((type(self).name, context.side))
        original(self, context)

    monkeypatch.setattr(ResidualScheme, "__init__", counting)
    return count


@pytest.mark.parametrize("scheme", [["--deepnorm"], ["--residual-scheme", "pre-ln"], ["--residual-scheme", "dlcl"]])
def test_encoder_decoder_build_constructs_two_schemes(tiny_data, constructions, scheme):
    build(tiny_data, *scheme, "--encoder-layers", 2, "--decoder-layers", 2)
    assert sorted(side for _, side in constructions) == ["decoder", "encoder"]


def test_language_model_build_constructs_one_scheme(mono_data, constructions):
    build(mono_data, "--deepnorm", "--decoder-layers", 2, "--decoder-embed-dim", 32, "--decoder-ffn-embed-dim", 64,
          "--decoder-attention-heads", 2, task_name="language_modeling", arch="deepnet_lm")
    assert constructions == [("deepnorm", "decoder")]


def test_encoder_only_build_constructs_one_scheme(mono_data, constructions):
    build(mono_data, "--deepnorm", "--encoder-layers", 2, task_name="masked_lm", arch="deepnet_roberta_tiny")
    assert constructions == [("deepnorm", "encoder")]


def test_pruned_model_logs_trained_and_built_depths(mono_data, caplog):
    with caplog.at_level(logging.INFO, logger="deepnet_fairseq.models.deepnet_roberta"):
        model, _ = build(mono_data, "--deepnorm", "--encoder-layers", 4, "--encoder-layers-to-keep", "0,2",
                         task_name="masked_lm", arch="deepnet_roberta_tiny")
    assert len(model.encoder.sentence_encoder.layers) == 2
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("deepnet_roberta"))
    assert line.startswith("deepnet_roberta 4L (built 2L after --*-layers-to-keep): deepnorm(alpha=")
    # the kept layers keep the constants of the trained depth N=4
    assert f"alpha={(2 * 4) ** 0.25:.4f}" in line


def test_layers_to_keep_on_the_command_line_builds_the_pruned_encoder_decoder(tiny_data, caplog):
    """fairseq's parser gives --encoder-layers-to-keep 0,2 as a list, which fairseq's own build_model
    cannot split; the model is built pruned, with the constants of the trained depths."""
    with caplog.at_level(logging.INFO, logger="deepnet_fairseq.models.deepnet_transformer"):
        model, _ = build(tiny_data, "--deepnorm", "--encoder-layers", 4, "--decoder-layers", 2,
                         "--encoder-layers-to-keep", "0,2")
    assert len(model.encoder.layers) == 2 and len(model.decoder.layers) == 2
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("deepnet_transformer"))
    assert line.startswith("deepnet_transformer 4L-2L (built 2L-2L after --*-layers-to-keep): encoder deepnorm(")
    assert f"alpha={0.81 * (4**4 * 2) ** (1 / 16):.4f}" in line


def test_every_scheme_option_is_a_flag_owned_by_its_scheme():
    declared = {spec.name: name for name, cls in SCHEMES.items() for spec in fields(cls.Options)}
    assert OPTION_OWNERS == declared
    plugin = {spec.name for spec in fields(DeepNetOptions)} - {"_name"}  # FairseqDataclass's own field
    assert plugin == set(declared) | {spec.name for spec in fields(RunOptions)}
    for model in (DeepNetTransformerModel, DeepNetRobertaModel):
        parser = argparse.ArgumentParser()
        model.add_args(parser)
        flags = {action.option_strings[0] for action in parser._actions if action.option_strings}
        assert {"--" + name.replace("_", "-") for name in plugin} <= flags


def test_scheme_option_with_another_scheme_is_refused_before_any_scheme_is_built(constructions):
    args = argparse.Namespace(residual_scheme="post-ln", deepnorm=False, encoder_layers=2, decoder_layers=2,
                              dlcl_history_window=3)
    with pytest.raises(DeepNetConfigError, match="--dlcl-history-window only applies with --residual-scheme dlcl"):
        plan_model(args, ("encoder", "decoder"))
    assert constructions == []


def test_scheme_validation_runs_once_before_construction(constructions):
    args = argparse.Namespace(residual_scheme="ds-init", deepnorm=False, encoder_layers=2, decoder_layers=2,
                              ds_init_alpha=1.5)
    with pytest.raises(DeepNetConfigError, match=r"--ds-init-alpha must be in \(0, 1\]"):
        plan_model(args, ("encoder", "decoder"))
    assert constructions == []
