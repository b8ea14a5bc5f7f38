"""Encoder and decoder stacks that build :mod:`deepnet_fairseq.modules.layers` layers.

Only fairseq's ``build_*_layer`` hooks are overridden; embedding, masking, incremental decoding and
the output projection are fairseq's own.  Each stack holds the residual scheme of its side, numbers
its layers from 1 (depth-dependent inits need the index, which fairseq does not pass) and lets the
scheme add stack-level hooks once all layers exist.
"""

from __future__ import annotations

from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import TransformerDecoderBase, TransformerEncoderBase
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from torch import nn

from deepnet_fairseq.modules.layers import DeepNetDecoderLayer, DeepNetEncoderLayer
from deepnet_fairseq.schemes.base import ResidualScheme


def wrap_layer(layer: nn.Module, cfg) -> nn.Module:
    """Apply fairseq's activation checkpointing and FSDP wrapping, exactly as its stacks do."""
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    # a checkpointed layer is always FSDP-wrapped, whatever its size (fairseq's rule)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not checkpoint else 0)


class DeepNetEncoder(TransformerEncoderBase):
    """fairseq's Transformer encoder with scheme-driven layers."""

    def __init__(self, cfg, dictionary, embed_tokens, scheme: ResidualScheme, return_fc: bool = False):
        # set before fairseq's constructor, which calls build_encoder_layer
        self.scheme = scheme
        self._layers_built = 0
        super().__init__(cfg, dictionary, embed_tokens, return_fc=return_fc)
        scheme.prepare_stack(self)

    def build_encoder_layer(self, cfg):
        self._layers_built += 1
        layer = DeepNetEncoderLayer(cfg, self.scheme, index=self._layers_built, return_fc=self.return_fc)
        return wrap_layer(layer, cfg)


class DeepNetDecoder(TransformerDecoderBase):
    """fairseq's Transformer decoder with scheme-driven layers."""

    def __init__(
        self,
        cfg,
        dictionary,
        embed_tokens,
        scheme: ResidualScheme,
        no_encoder_attn: bool = False,
        output_projection=None,
    ):
        self.scheme = scheme
        self._layers_built = 0
        super().__init__(
            cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn, output_projection=output_projection
        )
        scheme.prepare_stack(self)

    def build_decoder_layer(self, cfg, no_encoder_attn: bool = False):
        self._layers_built += 1
        layer = DeepNetDecoderLayer(cfg, self.scheme, index=self._layers_built, no_encoder_attn=no_encoder_attn)
        return wrap_layer(layer, cfg)
