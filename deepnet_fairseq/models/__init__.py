"""Registers ``deepnet_transformer`` (+ named architectures), ``deepnet_lm`` and ``deepnet_roberta``
(+ named architectures) with fairseq, after installing this plugin's fairseq fixes
(:func:`deepnet_fairseq.fairseq_fixes.install_fixes`): ``--user-dir deepnet_fairseq`` imports this
package whether or not the top-level package registered."""

from deepnet_fairseq.fairseq_fixes import install_fixes

install_fixes()

from deepnet_fairseq.models import deepnet_lm, deepnet_roberta, deepnet_transformer  # noqa: E402

__all__ = ["deepnet_lm", "deepnet_roberta", "deepnet_transformer"]
