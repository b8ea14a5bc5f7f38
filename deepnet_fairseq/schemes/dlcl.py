"""DLCL (Wang et al. 2019, "Learning Deep Transformer Models for Machine Translation"), pre-norm:
each layer's input is a learned combination of the normalised outputs of all earlier layers,

    x_{l+1} = sum_{k=0..l} W[l, k] * LN_k(y_k),   y_0 = embedding output, y_k = output of layer k,

and the stack output is one more combination (row L) followed by the stack's final LayerNorm.
``W`` is a lower-triangular (L+1) x (L+1) matrix of learned scalars initialised to the average
(row l = 1/(l+1)); every stack has its own.  ``--dlcl-history-window K`` keeps only the K most
recent entries (the reference's window option; default -1 = all).  Reference: wangqiangneu/dlcl,
``fairseq/modules/dlcl.py``.

Implemented with hooks, not a rewritten forward: a pre-hook on each layer pushes its incoming x
(the previous output, or the embedding for layer 1) and replaces it by the combination; a pre-hook
on the final LayerNorm does the last combination.  Incremental decoding works as is, since every
step runs all layers on the new positions.
"""

from dataclasses import dataclass
from functools import partial
from typing import Dict, Mapping, Optional

import torch
from fairseq.modules import LayerNorm
from torch import nn

from deepnet_fairseq.schemes.base import DeepNetConfigError, ResidualScheme, option, register_scheme


def average_lower_triangular(size: int) -> torch.Tensor:
    """Row l holds 1/(l+1) in columns 0..l and 0 above the diagonal."""
    weights = torch.zeros(size, size)
    for row in range(size):
        weights[row, : row + 1] = 1.0 / (row + 1)
    return weights


def _combine_history(stack: nn.Module, incoming: torch.Tensor, window: int) -> torch.Tensor:
    history = stack._dlcl_history
    position = len(history)
    history.append(stack.dlcl_layer_norms[position](incoming))
    first = 0 if window < 0 else max(0, position + 1 - window)
    weights = stack.dlcl_weights[position, first : position + 1]
    return torch.einsum("k,k...->...", weights, torch.stack(history[first:], dim=0))


def _before_layer(stack: nn.Module, window: int, is_first: bool, module: nn.Module, args):
    if is_first:
        stack._dlcl_history = []
    return (_combine_history(stack, args[0], window),) + tuple(args[1:])


def _before_final_norm(stack: nn.Module, window: int, module: nn.Module, args):
    combined = _combine_history(stack, args[0], window)
    stack._dlcl_history = []
    return (combined,)


@dataclass
class DLCLOptions:
    """``--residual-scheme dlcl``."""

    dlcl_history_window: Optional[int] = option(
        help="dlcl: combine only the last K layer outputs (-1 = all, default)", scheme_default=-1
    )


@register_scheme
class DLCLScheme(ResidualScheme):
    name = "dlcl"
    layer_norm = "pre"
    Options = DLCLOptions

    @classmethod
    def validate(cls, options: DLCLOptions, run: Mapping[str, object], sides: Dict[str, int]) -> None:
        window = int(options.dlcl_history_window)
        if window == 0 or window < -1:
            raise DeepNetConfigError(f"--dlcl-history-window must be -1 (all) or >= 1, got {window}")

    def __init__(self, context):
        super().__init__(context)
        self.window = int(self.options.dlcl_history_window)

    def prepare_stack(self, stack: nn.Module) -> None:
        layers = list(stack.layers)
        if getattr(stack, "layer_norm", None) is None:
            raise DeepNetConfigError(
                "--residual-scheme dlcl needs the stack's final LayerNorm (remove --no-decoder-final-norm)"
            )
        if type(stack.layers) is not nn.ModuleList:
            raise DeepNetConfigError("--residual-scheme dlcl does not support LayerDrop (--encoder/decoder-layerdrop)")
        size = len(layers) + 1
        dim = stack.layer_norm.normalized_shape[0]
        stack.dlcl_weights = nn.Parameter(average_lower_triangular(size))
        stack.dlcl_layer_norms = nn.ModuleList(LayerNorm(dim) for _ in range(size))
        stack._dlcl_history = []
        for position, layer in enumerate(layers):
            layer.register_forward_pre_hook(partial(_before_layer, stack, self.window, position == 0))
        stack.layer_norm.register_forward_pre_hook(partial(_before_final_norm, stack, self.window))

    def settings(self) -> dict:
        return {"window": self.window}

    def describe(self) -> str:
        return f"dlcl(window={self.window})"
