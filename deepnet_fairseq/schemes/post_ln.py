"""Post-LN (Vaswani et al. 2017): ``x <- LN(x + G(x))`` with fairseq's default initialisation.

This is fairseq's own Transformer sub-layer, unchanged (bit-identical outputs; tested).
"""

from deepnet_fairseq.schemes.base import ResidualScheme, register_scheme


@register_scheme
class PostLNScheme(ResidualScheme):
    name = "post-ln"
    layer_norm = "post"
