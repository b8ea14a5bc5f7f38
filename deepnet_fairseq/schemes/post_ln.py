"""Post-LN (Vaswani et al. 2017): ``x <- LN(x + G(x))`` with fairseq's default initialisation."""

from deepnet_fairseq.schemes.base import ResidualScheme


class PostLNScheme(ResidualScheme):
    """fairseq's own Transformer sub-layer, unchanged."""

    name = "post-ln"
