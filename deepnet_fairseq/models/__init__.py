"""Registers ``deepnet_transformer`` (+ named architectures), ``deepnet_lm`` and ``deepnet_roberta``
(+ named architectures) with fairseq."""

from deepnet_fairseq.models import deepnet_lm, deepnet_roberta, deepnet_transformer

__all__ = ["deepnet_lm", "deepnet_roberta", "deepnet_transformer"]
