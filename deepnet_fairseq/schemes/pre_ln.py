"""Pre-LN (Xiong et al. 2020; tensor2tensor): ``x <- x + G(LN(x))`` and a final LayerNorm per stack.

fairseq implements it natively (``normalize_before``); the scheme only selects it.
"""

from deepnet_fairseq.schemes.base import ResidualScheme, register_scheme


@register_scheme
class PreLNScheme(ResidualScheme):
    name = "pre-ln"
    layer_norm = "pre"
