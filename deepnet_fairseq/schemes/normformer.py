"""NormFormer (Shleifer, Weston & Ott 2021): Pre-LN plus three normalisation extras per layer,

* attention: ``x <- x + LN_attn(HeadScale(Attn(LN x)))``, HeadScale a learned scale per head (init 1);
* FFN: ``x <- lambda * x + fc2(LN_ffn(act(fc1(LN x))))`` (lambda, init 1, only with
  ``--normformer-scale-resids``),

in the encoder and the decoder (self-attention only; cross-attention unchanged, as fairseq).  The
paper scales each head's output *before* W_o (default, ``--normformer-head-scale-position paper``);
fairseq's decoder implementation scales the chunks of the output *after* out_proj (``fairseq``),
which its maintainers call not mathematically equivalent.  Init: fairseq's defaults.
"""

from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.modules import LayerNorm
from torch import Tensor, nn

from deepnet_fairseq.schemes.base import DeepNetConfigError, ResidualScheme, option, register_scheme
from deepnet_fairseq.schemes.init import add_input_transform, add_output_transform, route_through_modules_

HEAD_SCALE_POSITIONS = ("paper", "fairseq")


@dataclass
class NormFormerOptions:
    """``--residual-scheme normformer``."""

    normformer_head_scale_position: Optional[ChoiceEnum(HEAD_SCALE_POSITIONS)] = option(
        help="normformer: head scale before W_o (paper, default) or after out_proj", scheme_default="paper"
    )
    normformer_scale_resids: bool = option(
        False, help="normformer: learned residual scale lambda on the FFN sub-layer"
    )


class HeadScale(nn.Module):
    """Multiply each head's slice of the last dimension by a learned scalar (init 1)."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.weight = nn.Parameter(torch.ones(num_heads))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        heads = x.reshape(*shape[:-1], self.num_heads, self.head_dim) * self.weight.unsqueeze(-1)
        return heads.reshape(shape)


@register_scheme
class NormFormerScheme(ResidualScheme):
    name = "normformer"
    layer_norm = "pre"
    Options = NormFormerOptions

    @classmethod
    def validate(cls, options: NormFormerOptions, run: Mapping[str, object], sides: Dict[str, int]) -> None:
        if str(options.normformer_head_scale_position) not in HEAD_SCALE_POSITIONS:
            choices = ", ".join(HEAD_SCALE_POSITIONS)
            raise DeepNetConfigError(f"--normformer-head-scale-position must be one of {choices}")

    def __init__(self, context):
        super().__init__(context)
        self.position = str(self.options.normformer_head_scale_position)
        self.scale_resids = bool(self.options.normformer_scale_resids)

    def prepare_layer(self, layer: nn.Module, index: int) -> None:
        attention = layer.self_attn
        head_scale = HeadScale(attention.num_heads, attention.head_dim)
        if self.position == "paper":
            route_through_modules_(attention)
            add_input_transform(layer, "normformer_head_scale", head_scale, attention.out_proj)
        else:
            add_output_transform(layer, "normformer_head_scale", head_scale, attention)
        add_output_transform(layer, "normformer_attn_ln", LayerNorm(layer.embed_dim), attention)
        add_input_transform(layer, "normformer_ffn_ln", LayerNorm(layer.fc1.out_features), layer.fc2)
        if self.scale_resids:
            layer.normformer_resid_scale = nn.Parameter(torch.ones(layer.embed_dim))

    def combine(self, layer: nn.Module, sublayer: str, branch: Tensor, residual: Tensor) -> Tensor:
        if sublayer == "ffn" and self.scale_resids:
            return layer.normformer_resid_scale * residual + branch
        return residual + branch

    def settings(self) -> dict:
        return {"head_scale": self.position, "scale_resids": self.scale_resids}

    def describe(self) -> str:
        return f"normformer(head_scale={self.position}, scale_resids={self.scale_resids})"
