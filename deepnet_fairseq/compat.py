"""Fixes for fairseq-fixed (fairseq main) behaviour that silently loses data.

``fairseq.data.data_utils.batch_by_size`` on fairseq main drops the last batch when its size is not
a multiple of ``--required-batch-size-multiple`` (default 8).  fairseq 0.12.2 kept it.  The effect
is silent: ``fairseq-generate`` translates fewer sentences than the test set has (BLEU on a subset),
validation skips sentences, and every training epoch skips its last few.  We restore 0.12.2's
behaviour: the remaining indices form a final, smaller batch.
"""

from __future__ import annotations

import functools


def install_keep_last_batch() -> None:
    """Patch ``data_utils.batch_by_size`` to keep the last batch (idempotent)."""
    from fairseq.data import data_utils

    if getattr(data_utils.batch_by_size, "_deepnet_keeps_last", False):
        return
    fairseq_batch_by_size = data_utils.batch_by_size

    @functools.wraps(fairseq_batch_by_size)
    def batch_by_size(indices, *args, **kwargs):
        batches = fairseq_batch_by_size(indices, *args, **kwargs)
        if kwargs.get("fixed_shapes") is not None or (len(args) >= 6 and args[5] is not None):
            return batches
        covered = sum(len(batch) for batch in batches)
        if covered < len(indices):
            batches = list(batches) + [indices[covered:]]
        return batches

    batch_by_size._deepnet_keeps_last = True
    data_utils.batch_by_size = batch_by_size
