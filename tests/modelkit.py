"""Building models the way fairseq does, and measuring them with hooks (shared by the model tests)."""

from __future__ import annotations

import math

import torch
from fairseq import options, tasks, utils

from conftest import USER_DIR


def build(data, *flags, task_name="translation", arch="deepnet_transformer_tiny"):
    """Parse a fairseq-train command line and build the model with ``task.build_model``."""
    parser = options.get_training_parser(default_task=task_name)
    argv = [str(data), "--user-dir", USER_DIR, "--task", task_name, "--arch", arch, "--cpu", *map(str, flags)]
    args = options.parse_args_and_arch(parser, argv)
    utils.import_user_module(args)
    task = tasks.setup_task(args)
    torch.manual_seed(0)
    model = task.build_model(args)
    model.eval()
    return model, task


def sample_batch(task, n=4, src_len=7, tgt_len=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vocab = len(task.source_dictionary)
    src = torch.randint(4, vocab, (n, src_len), generator=gen)
    prev = torch.randint(4, vocab, (n, tgt_len), generator=gen)
    prev[:, 0] = task.target_dictionary.eos()
    return src, torch.full((n,), src_len), prev


def paper_constants(n, m):
    return {
        "encoder": (0.81 * (n**4 * m) ** (1 / 16), 0.87 * (n**4 * m) ** (-1 / 16)),
        "decoder": ((3 * m) ** 0.25, (12 * m) ** -0.25),
    }


def _pre(store, key):
    def hook(module, inputs):
        store[key] = inputs[0].detach().clone()
    return hook


def _post(store, key, first=False):
    def hook(module, inputs, output):
        store[key] = (output[0] if first else output).detach().clone()
    return hook


def check_ln_inputs(layers, run_forward, alpha, kinds):
    """Hook every sub-layer: assert LN_in == alpha * x + G(x), x being the sub-layer's input.

    Returns the number of sub-layers checked.
    """
    hooks, stores = [], []
    for layer in layers:
        s = {}
        stores.append(s)
        hooks += [
            layer.register_forward_pre_hook(_pre(s, "layer_in")),
            layer.self_attn.register_forward_hook(_post(s, "self_g", first=True)),
            layer.self_attn_layer_norm.register_forward_pre_hook(_pre(s, "self_ln_in")),
            layer.self_attn_layer_norm.register_forward_hook(_post(s, "self_ln_out")),
            layer.fc2.register_forward_hook(_post(s, "ffn_g")),
            layer.final_layer_norm.register_forward_pre_hook(_pre(s, "ffn_ln_in")),
        ]
        if "cross" in kinds:
            hooks += [
                layer.encoder_attn.register_forward_hook(_post(s, "cross_g", first=True)),
                layer.encoder_attn_layer_norm.register_forward_pre_hook(_pre(s, "cross_ln_in")),
                layer.encoder_attn_layer_norm.register_forward_hook(_post(s, "cross_ln_out")),
            ]
    try:
        run_forward()
    finally:
        for h in hooks:
            h.remove()
    checked = 0
    for s in stores:
        if "cross" in kinds:
            triples = [("layer_in", "self_g", "self_ln_in"), ("self_ln_out", "cross_g", "cross_ln_in"),
                       ("cross_ln_out", "ffn_g", "ffn_ln_in")]
        else:
            triples = [("layer_in", "self_g", "self_ln_in"), ("self_ln_out", "ffn_g", "ffn_ln_in")]
        for x, g, ln_in in triples:
            torch.testing.assert_close(s[ln_in], alpha * s[x] + s[g], rtol=1e-5, atol=1e-5)
            checked += 1
    return checked


def pooled_std(layers, name):
    return torch.cat([layer.get_submodule(name).weight.detach().flatten() for layer in layers]).std().item()


def xavier_std(module, gain=1.0):
    fan_out, fan_in = module.weight.shape
    return gain * math.sqrt(2.0 / (fan_in + fan_out))
