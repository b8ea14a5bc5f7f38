"""Registers ``deepnet_transformer`` (+ named architectures) and ``deepnet_lm`` with fairseq."""

from deepnet_fairseq.models import deepnet_lm, deepnet_transformer

__all__ = ["deepnet_lm", "deepnet_transformer"]
