"""Sandwich-LN (CogView; Ding et al. 2021): Pre-LN plus a LayerNorm on each branch's output,
``x <- x + LN_out(G(LN_in x))`` for every sub-layer (self-attention, cross-attention, FFN), and the
stack's final LayerNorm.

Init (Megatron style, as CogView): every attention/FFN weight ~ N(0, 0.02), the output projections
(out_proj, fc2) ~ N(0, 0.02 / sqrt(2 L)) with L the stack's layer count; biases zero.
"""

import math

from fairseq.modules import LayerNorm
from torch import nn

from deepnet_fairseq.schemes.base import ResidualScheme, linear_modules, register_scheme
from deepnet_fairseq.schemes.init import add_output_transform, attention_modules

INIT_STD = 0.02


@register_scheme
class SandwichLNScheme(ResidualScheme):
    name = "sandwich-ln"
    layer_norm = "pre"

    def prepare_layer(self, layer: nn.Module, index: int) -> None:
        for sublayer, attention in attention_modules(layer):
            add_output_transform(layer, f"sandwich_{sublayer}_out_ln", LayerNorm(layer.embed_dim), attention)
        add_output_transform(layer, "sandwich_ffn_out_ln", LayerNorm(layer.embed_dim), layer.fc2)

    def initialize_layer(self, layer: nn.Module, index: int) -> None:
        output_std = INIT_STD / math.sqrt(2 * self.context.layers)
        for name, module in linear_modules(layer).items():
            std = output_std if name == "fc2" or name.endswith("out_proj") else INIT_STD
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
