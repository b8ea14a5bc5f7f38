"""Initialisation and structure helpers shared by several schemes."""

from __future__ import annotations

import math
from functools import partial

from torch import nn

FFN_LINEARS = ("fc1", "fc2")
LAYER_NORMS = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")


def xavier_ffn_(layer: nn.Module) -> None:
    """Re-base fc1/fc2 on Xavier-uniform with zero bias.

    fairseq 0.12 builds the FFN from plain ``nn.Linear`` (kaiming-uniform, non-zero bias), while
    the fairseq 0.6-0.9 code every peer method was published with used ``xavier_uniform_`` and zero
    bias; the attention projections are initialised the same way in both, so they are kept.
    """
    for name in FFN_LINEARS:
        module = layer.get_submodule(name)
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


def xavier_bound(module: nn.Linear) -> float:
    """Xavier-uniform bound sqrt(6 / (fan_in + fan_out))."""
    fan_out, fan_in = module.weight.shape
    return math.sqrt(6.0 / (fan_in + fan_out))


def remove_layer_norms_(layer: nn.Module) -> None:
    """Replace a Post-LN layer's LayerNorms by identities (for LN-free schemes)."""
    for name in LAYER_NORMS:
        if getattr(layer, name, None) is not None:
            setattr(layer, name, nn.Identity())


def route_through_modules_(attention: nn.Module) -> None:
    """Make fairseq's MultiheadAttention call its q/k/v/out ``nn.Linear`` modules.

    Its fast path hands the raw weights to ``F.multi_head_attention_forward``, so hooks on
    ``out_proj`` would never run; ``skip_embed_dim_check`` selects the module path (same maths).
    """
    attention.skip_embed_dim_check = True


def attention_modules(layer: nn.Module, cross: bool = True):
    """``[(sublayer name, MultiheadAttention)]`` of a fairseq layer."""
    found = [("self_attn", layer.self_attn)]
    if cross and getattr(layer, "encoder_attn", None) is not None:
        found.append(("encoder_attn", layer.encoder_attn))
    return found


# Hook functions are module-level and bound with functools.partial to the layer that owns the extra
# module: copy.deepcopy of the model (fairseq's EMA) then rebinds them to the copy.
def _apply_to_input(owner: nn.Module, name: str, module: nn.Module, args):
    return (getattr(owner, name)(args[0]),) + tuple(args[1:])


def _apply_to_output(owner: nn.Module, name: str, module: nn.Module, args, output):
    if isinstance(output, tuple):
        return (getattr(owner, name)(output[0]),) + tuple(output[1:])
    return getattr(owner, name)(output)


def add_input_transform(owner: nn.Module, name: str, transform: nn.Module, target: nn.Module) -> None:
    """Register ``transform`` as ``owner.<name>`` and apply it to ``target``'s first input."""
    owner.add_module(name, transform)
    target.register_forward_pre_hook(partial(_apply_to_input, owner, name))


def add_output_transform(owner: nn.Module, name: str, transform: nn.Module, target: nn.Module) -> None:
    """Register ``transform`` as ``owner.<name>`` and apply it to ``target``'s output (first item)."""
    owner.add_module(name, transform)
    target.register_forward_hook(partial(_apply_to_output, owner, name))
