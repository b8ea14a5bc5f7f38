"""deepnet_fairseq.build: models built from a fairseq-train command line, as fairseq-train builds them."""

from __future__ import annotations

import pytest
import torch
from fairseq.models.transformer import TransformerModel

from deepnet_fairseq.build import PLUGIN_DIR, build_from_command_line, parse_command_line
from deepnet_fairseq.models.deepnet_transformer import DeepNetTransformerModel

TINY = ("--encoder-layers", 2, "--decoder-layers", 2, "--cpu")


def test_plugin_and_stock_architectures_build_from_the_same_helper(tiny_data):
    deep = build_from_command_line([tiny_data, "--arch", "deepnet_transformer_tiny", "--deepnorm", *TINY])
    stock = build_from_command_line([tiny_data, "--arch", "transformer", *TINY])
    assert isinstance(deep.model, DeepNetTransformerModel) and deep.args.user_dir == PLUGIN_DIR
    assert type(stock.model) is TransformerModel and stock.args.user_dir == PLUGIN_DIR
    assert deep.args.deepnorm and not hasattr(stock.args, "deepnorm")  # no plugin option on a stock arch
    assert len(stock.model.encoder.layers) == 2 and stock.args.task == "translation"
    assert len(stock.task.source_dictionary) == len(deep.task.source_dictionary)


def test_the_seed_fixes_the_initial_weights(tiny_data):
    argv = [tiny_data, "--arch", "deepnet_transformer_tiny", *TINY]
    first, again = build_from_command_line(argv, seed=3), build_from_command_line(argv, seed=3)
    other = build_from_command_line(argv, seed=4)
    weights = [dict(built.model.state_dict()) for built in (first, again, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


@pytest.mark.parametrize("flag", ["--task", "--user-dir", "--task=translation"])
def test_the_flags_the_helper_sets_are_refused_in_argv(tiny_data, flag):
    argv = [tiny_data, "--arch", "transformer", flag] + ([] if "=" in flag else ["x"])
    with pytest.raises(ValueError, match=flag.split("=")[0]):
        parse_command_line(argv)
