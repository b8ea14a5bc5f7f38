"""Sub-LN (Magneto; Wang et al. 2022, "Foundation Transformers"): Pre-LN plus an inner LayerNorm in
each branch, ``x <- x + W_o LN(Attn(LN x))`` and ``x <- x + fc2(LN(act(fc1(LN x))))``.

Init: Xavier-based linears, then fc1, fc2, v_proj and out_proj multiplied by gamma:
encoder-only / decoder-only ``sqrt(ln 2N)``; encoder-decoder encoder ``sqrt(ln(3M) ln(2N) / 3)``,
decoder ``sqrt(ln 3M)``.  As in microsoft/torchscale, cross-attention gets no inner LayerNorm and
no gamma scaling.
"""

import math

from fairseq.modules import LayerNorm
from torch import nn

from deepnet_fairseq.schemes.base import ResidualScheme, register_scheme
from deepnet_fairseq.schemes.init import add_input_transform, route_through_modules_, xavier_ffn_

SCALED = ("fc1", "fc2", "self_attn.v_proj", "self_attn.out_proj")


@register_scheme
class SubLNScheme(ResidualScheme):
    name = "sub-ln"
    layer_norm = "pre"

    def __init__(self, context):
        super().__init__(context)
        n, m = context.encoder_layers, context.decoder_layers
        if n and m:
            self.gamma = math.sqrt(math.log(3 * m) * math.log(2 * n) / 3) if context.side == "encoder" else math.sqrt(
                math.log(3 * m)
            )
        else:
            self.gamma = math.sqrt(math.log(2 * (n or m)))

    def prepare_layer(self, layer: nn.Module, index: int) -> None:
        route_through_modules_(layer.self_attn)
        add_input_transform(layer, "sub_ln_attn", LayerNorm(layer.embed_dim), layer.self_attn.out_proj)
        add_input_transform(layer, "sub_ln_ffn", LayerNorm(layer.fc1.out_features), layer.fc2)

    def initialize_layer(self, layer: nn.Module, index: int) -> None:
        xavier_ffn_(layer)
        for name in SCALED:
            layer.get_submodule(name).weight.data.mul_(self.gamma)

    def init_settings(self) -> dict:
        return {"gamma": self.gamma}

    def describe(self) -> str:
        return f"sub-ln(gamma={self.gamma:.4f})"
