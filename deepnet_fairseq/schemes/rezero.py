"""ReZero (Bachlechner et al. 2020, "ReZero is All You Need"): ``x <- x + a * G(x)``, no LayerNorm.

One scalar ``a`` per layer (shared by its sub-layers, as in the reference ``RZTX*Layer``'s
``resweight``), initialised to 0 so that every layer starts as the identity.  The DeepNet paper found
ReZero unstable in half precision even for shallow models: ``--fp16`` is refused unless
``--allow-rezero-fp16``.
"""

import torch
from torch import Tensor, nn

from deepnet_fairseq.schemes.base import ResidualScheme, register_scheme
from deepnet_fairseq.schemes.init import remove_layer_norms_, xavier_ffn_


@register_scheme
class ReZeroScheme(ResidualScheme):
    name = "rezero"
    layer_norm = "none"

    def prepare_layer(self, layer: nn.Module, index: int) -> None:
        remove_layer_norms_(layer)
        layer.rezero_weight = nn.Parameter(torch.zeros(1))

    def initialize_layer(self, layer: nn.Module, index: int) -> None:
        xavier_ffn_(layer)

    def combine(self, layer: nn.Module, sublayer: str, branch: Tensor, residual: Tensor) -> Tensor:
        return residual + layer.rezero_weight * branch
