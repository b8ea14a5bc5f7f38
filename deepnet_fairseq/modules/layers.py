"""fairseq Transformer layers whose residual connection and init are delegated to a residual scheme.

Submodule and parameter names are fairseq's own (``self_attn``, ``encoder_attn``, ``fc1``, ``fc2``,
``self_attn_layer_norm``, ...), so state dicts and fairseq tools work unchanged.  The scheme
initialises the layer inside its constructor, i.e. before fairseq's activation checkpointing or
FSDP wrapping touches the parameters.
"""

from __future__ import annotations

from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from torch import Tensor

from deepnet_fairseq.schemes.base import ResidualScheme


class DeepNetEncoderLayer(TransformerEncoderLayerBase):
    """Encoder layer: two sub-layers (self-attention, FFN), each ``LN(scheme.combine(G(x), x))``."""

    def __init__(self, cfg, scheme: ResidualScheme, return_fc: bool = False):
        super().__init__(cfg, return_fc=return_fc)
        self.scheme = scheme
        scheme.initialize_layer(self)

    def residual_connection(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.scheme.combine(x, residual)


class DeepNetDecoderLayer(TransformerDecoderLayerBase):
    """Decoder layer: three sub-layers (self-attention, cross-attention, FFN)."""

    def __init__(self, cfg, scheme: ResidualScheme, no_encoder_attn: bool = False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn)
        self.scheme = scheme
        scheme.initialize_layer(self)

    def residual_connection(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.scheme.combine(x, residual)
