"""fairseq Transformer layers whose residual connection and init are delegated to a residual scheme.

Submodule and parameter names are fairseq's own (``self_attn``, ``encoder_attn``, ``fc1``, ``fc2``,
``self_attn_layer_norm``, ...), so state dicts and fairseq tools work unchanged; schemes only add
parameters of their own.  fairseq's layer ``forward`` calls ``residual_connection`` once per
sub-layer, in order (self-attention, cross-attention, FFN); the layer counts those calls so the
scheme knows which sub-layer it is combining.
"""

from __future__ import annotations

from typing import Tuple

from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from torch import Tensor

from deepnet_fairseq.schemes.base import ResidualScheme


class SchemeLayerMixin:
    """Delegates ``residual_connection`` to ``self.scheme`` with the sub-layer's name."""

    scheme: ResidualScheme
    sublayers: Tuple[str, ...]

    def _attach_scheme(self, scheme: ResidualScheme, index: int, sublayers: Tuple[str, ...]) -> None:
        self.scheme = scheme
        self.layer_index = index
        self.sublayers = sublayers
        self._next_sublayer = 0
        scheme.prepare_layer(self, index)
        scheme.initialize_layer(self, index)

    def forward(self, *args, **kwargs):
        self._next_sublayer = 0
        return super().forward(*args, **kwargs)

    def residual_connection(self, x: Tensor, residual: Tensor) -> Tensor:
        sublayer = self.sublayers[self._next_sublayer]
        self._next_sublayer += 1
        observer = self.__dict__.get("stability_observer")  # set only by --log-stability
        if observer is not None:
            observer.observe_residual(self, sublayer, x, residual)
        return self.scheme.combine(self, sublayer, x, residual)


class DeepNetEncoderLayer(SchemeLayerMixin, TransformerEncoderLayerBase):
    """Encoder layer: two sub-layers (self-attention, FFN)."""

    def __init__(self, cfg, scheme: ResidualScheme, index: int = 1, return_fc: bool = False):
        super().__init__(cfg, return_fc=return_fc)
        self._attach_scheme(scheme, index, ("self_attn", "ffn"))


class DeepNetDecoderLayer(SchemeLayerMixin, TransformerDecoderLayerBase):
    """Decoder layer: three sub-layers (self-attention, cross-attention, FFN), two without encoder."""

    def __init__(self, cfg, scheme: ResidualScheme, index: int = 1, no_encoder_attn: bool = False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn)
        sublayers = ("self_attn", "ffn") if no_encoder_attn else ("self_attn", "encoder_attn", "ffn")
        self._attach_scheme(scheme, index, sublayers)
