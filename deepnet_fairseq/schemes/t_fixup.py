"""T-Fixup (Huang, Perez, Ba & Volkovs 2020, "Improving Transformer Optimization Through Better
Initialization"): no LayerNorm (``x <- x + G(x)``), trained without warmup, with the init

* encoder: fc1, fc2, out_proj x ``0.67 N^(-1/4)``; v_proj x ``0.67 N^(-1/4) sqrt(2)``;
* decoder: fc1, fc2, out_proj (self and cross) x ``(9M)^(-1/4)``; v_proj x ``(9M)^(-1/4) sqrt(2)``;
* token embeddings: encoder x ``(9N)^(-1/4)``, decoder x ``(9M)^(-1/4)`` unless shared with the encoder,

on top of Xavier-uniform linears (fairseq's attention init, whose 1/sqrt(2) gain on v the sqrt(2)
undoes).  Reference: layer6ai-labs/T-Fixup ``fixup_initialization``.
"""

import math

from torch import nn

from deepnet_fairseq.schemes.base import ResidualScheme, linear_modules, register_scheme
from deepnet_fairseq.schemes.init import remove_layer_norms_, xavier_ffn_


@register_scheme
class TFixupScheme(ResidualScheme):
    name = "t-fixup"
    layer_norm = "none"

    def __init__(self, context):
        super().__init__(context)
        if context.side == "encoder":
            self.scale = 0.67 * context.encoder_layers ** (-1 / 4)
            self.embed_scale = (9 * context.encoder_layers) ** (-1 / 4)
        else:
            self.scale = (9 * context.decoder_layers) ** (-1 / 4)
            self.embed_scale = (9 * context.decoder_layers) ** (-1 / 4)

    def prepare_layer(self, layer: nn.Module, index: int) -> None:
        remove_layer_norms_(layer)

    def initialize_layer(self, layer: nn.Module, index: int) -> None:
        xavier_ffn_(layer)
        for name, module in linear_modules(layer).items():
            if name.endswith("v_proj"):
                module.weight.data.mul_(self.scale * math.sqrt(2))
            elif name.endswith("out_proj") or name in ("fc1", "fc2"):
                module.weight.data.mul_(self.scale)

    def prepare_stack(self, stack: nn.Module) -> None:
        shared = self.context.share_all_embeddings
        if self.context.side == "decoder" and shared and self.context.encoder_layers:
            return  # the encoder already scaled the shared table
        stack.embed_tokens.weight.data.mul_(self.embed_scale)

    def init_settings(self) -> dict:
        return {"scale": self.scale, "embed_scale": self.embed_scale}

    def describe(self) -> str:
        return f"t-fixup(scale={self.scale:.4f}, embed_scale={self.embed_scale:.4f})"
