"""Building models the way fairseq does, and measuring them with hooks (shared by the model tests)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Tuple, Union

import torch
from torch import nn

from deepnet_fairseq.build import build_from_command_line


def build(data, *flags, task_name="translation", arch="deepnet_transformer_tiny"):
    """``(model, task)``: ``fairseq-train data --arch arch --cpu flags`` built with seed 0, in eval mode."""
    built = build_from_command_line([data, "--arch", arch, "--cpu", *flags], task=task_name)
    built.model.eval()
    return built.model, built.task


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


@dataclass
class Captured:
    """What :func:`capture` recorded, per name: the last call's input and output (detached copies)."""

    inputs: Dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: Dict[str, torch.Tensor] = field(default_factory=dict)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture(modules: Mapping[str, nn.Module], *, inputs: bool = True, outputs: bool = True,
            input_key: Union[int, str] = 0, prepend: bool = False) -> Iterator[Captured]:
    """Record, per name, what each module received and returned in the forwards run inside the block.

    ``inputs[name]``: the argument ``input_key`` (a position, or a keyword such as ``"query"``) of the
    module's last call; ``outputs[name]``: its output (the first item of a tuple output, as attention and
    decoder layers return). Both are detached clones. ``prepend`` puts the hooks before the module's
    existing ones (e.g. a scheme's own pre-hook). Every handle is removed on leaving the block, also on
    an exception.
    """
    captured, handles = Captured(), []

    def keep_input(name, module, args, kwargs):
        value = kwargs[input_key] if isinstance(input_key, str) else args[input_key]
        captured.inputs[name] = value.detach().clone()

    def keep_output(name, module, args, output):
        captured.outputs[name] = _first(output).detach().clone()

    try:
        for name, module in modules.items():
            if inputs:
                handles.append(module.register_forward_pre_hook(
                    lambda m, a, k, n=name: keep_input(n, m, a, k), with_kwargs=True, prepend=prepend))
            if outputs:
                handles.append(module.register_forward_hook(
                    lambda m, a, o, n=name: keep_output(n, m, a, o), prepend=prepend))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def residual_io(layers, run_forward, cross: bool) -> List[List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Per layer, per sub-layer in forward order (self-attention, cross-attention if ``cross``, FFN):
    ``(x, G(x), LN_in)`` seen in ``run_forward()``.

    x is the layer's input for the first sub-layer and the previous sub-layer's LayerNorm output after it
    (the Post-LN layout), G(x) the branch's output (the attention, or ``fc2``), LN_in what the sub-layer's
    LayerNorm received.
    """
    subs = [("self_attn", "self_attn_layer_norm"), ("fc2", "final_layer_norm")]
    if cross:
        subs.insert(1, ("encoder_attn", "encoder_attn_layer_norm"))
    received = {f"{i}.{name}": layer.get_submodule(name) for i, layer in enumerate(layers)
                for name in ("", *(norm for _, norm in subs))}
    returned = {f"{i}.{name}": layer.get_submodule(name) for i, layer in enumerate(layers) for sub in subs
                for name in sub}
    with capture(received, outputs=False) as seen_in, capture(returned, inputs=False) as seen_out:
        run_forward()
    records = []
    for i in range(len(layers)):
        xs = [seen_in.inputs[f"{i}."]] + [seen_out.outputs[f"{i}.{norm}"] for _, norm in subs[:-1]]
        records.append([(x, seen_out.outputs[f"{i}.{branch}"], seen_in.inputs[f"{i}.{norm}"])
                        for x, (branch, norm) in zip(xs, subs, strict=True)])
    return records


def check_ln_inputs(layers, run_forward, alpha, kinds):
    """Hook every sub-layer: assert LN_in == alpha * x + G(x), x being the sub-layer's input
    (:func:`residual_io`; ``kinds``: ``{"self"}``, or ``{"self", "cross"}`` for decoder layers).

    Returns the number of sub-layers checked.
    """
    checked = 0
    for layer in residual_io(layers, run_forward, "cross" in kinds):
        for x, g, ln_in in layer:
            torch.testing.assert_close(ln_in, alpha * x + g, rtol=1e-5, atol=1e-5)
            checked += 1
    return checked


def pooled_std(layers, name):
    return torch.cat([layer.get_submodule(name).weight.detach().flatten() for layer in layers]).std().item()


def xavier_std(module, gain=1.0):
    fan_out, fan_in = module.weight.shape
    return gain * math.sqrt(2.0 / (fan_in + fan_out))
