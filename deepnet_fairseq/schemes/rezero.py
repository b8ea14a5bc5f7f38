"""ReZero (Bachlechner et al. 2020, "ReZero is All You Need"): ``x <- x + a * G(x)``, no LayerNorm.

One scalar ``a`` per layer (shared by its sub-layers, as in the reference ``RZTX*Layer``'s
``resweight``), initialised to 0 so that every layer starts as the identity.  The DeepNet paper found
ReZero unstable in half precision even for shallow models: ``--fp16`` is refused unless
``--allow-rezero-fp16``.
"""

from dataclasses import dataclass
from typing import Dict, Mapping

import torch
from torch import Tensor, nn

from deepnet_fairseq.schemes.base import DeepNetConfigError, ResidualScheme, option, register_scheme
from deepnet_fairseq.schemes.init import remove_layer_norms_, xavier_ffn_


@dataclass
class ReZeroOptions:
    """``--residual-scheme rezero``."""

    allow_rezero_fp16: bool = option(
        False, help="rezero: allow --fp16 (the DeepNet paper found ReZero unstable in fp16)"
    )


@register_scheme
class ReZeroScheme(ResidualScheme):
    name = "rezero"
    layer_norm = "none"
    Options = ReZeroOptions

    @classmethod
    def validate(cls, options: ReZeroOptions, run: Mapping[str, object], sides: Dict[str, int]) -> None:
        if (run.get("fp16") or run.get("memory_efficient_fp16")) and not options.allow_rezero_fp16:
            raise DeepNetConfigError(
                "--residual-scheme rezero with --fp16: the DeepNet paper found ReZero unstable in half precision "
                "even for shallow models; train in fp32/--bf16, or pass --allow-rezero-fp16 to insist"
            )

    def prepare_layer(self, layer: nn.Module, index: int) -> None:
        remove_layer_norms_(layer)
        layer.rezero_weight = nn.Parameter(torch.zeros(1))

    def initialize_layer(self, layer: nn.Module, index: int) -> None:
        xavier_ffn_(layer)

    def combine(self, layer: nn.Module, sublayer: str, branch: Tensor, residual: Tensor) -> Tensor:
        return residual + layer.rezero_weight * branch
