"""Residual schemes: how a sub-layer combines its input x with its branch G(x), and how it starts."""

from deepnet_fairseq.schemes.base import ResidualScheme
from deepnet_fairseq.schemes.deepnorm import DeepNormScheme
from deepnet_fairseq.schemes.post_ln import PostLNScheme

__all__ = ["ResidualScheme", "DeepNormScheme", "PostLNScheme"]
