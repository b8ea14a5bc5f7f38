"""Fixes for fairseq-fixed (fairseq main): a batch it silently drops, and NumPy names it still uses.

Last batch.  ``fairseq.data.data_utils.batch_by_size`` on fairseq main drops the last batch when its
size is not a multiple of ``--required-batch-size-multiple`` (default 8).  fairseq 0.12.2 kept it.
The effect is silent: ``fairseq-generate`` translates fewer sentences than the test set has (BLEU on
a subset), validation skips sentences, and every training epoch skips its last few.  We restore
0.12.2's behaviour: the remaining indices form a final, smaller batch.

NumPy 2.  A few fairseq modules still use names that NumPy has removed (``np.int``/``np.float`` in
1.24; ``np.compat`` in 2.0; ``percentile(interpolation=)`` by 2.4): ``np.compat.long``
(language-model data with ``--sample-break-mode eos``, so hub ``sample()``/``score()``/
``generate()`` and ``fairseq-interactive --task language_modeling``; ``--num-batch-buckets``),
``np.percentile(..., interpolation=)`` (``--num-batch-buckets``), ``np.int`` (wav2vec-style span
masking with ``no_overlap``, which then stops at fairseq's own ``Generator.randint`` bug on any
NumPy) and ``np.float`` (the CRF of ``nacrf_transformer``).  Each of those modules gets its own view
of NumPy (:class:`FairseqNumpy`) in place of its ``np`` global: the removed names resolve to what
NumPy 1.x defined them as, and ``interpolation=`` is passed on as ``method=``.  The ``numpy`` module
itself is left unchanged (other code tests ``hasattr(numpy, ...)`` to tell versions apart).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
from typing import Any

import numpy


def install_keep_last_batch() -> None:
    """Patch ``data_utils.batch_by_size`` to keep the last batch (idempotent).

    Its arguments are bound by name (``fixed_shapes`` batches are left as fairseq makes them); the
    ``keep_last_batch`` fix of :mod:`deepnet_fairseq.fairseq_fixes` checks those names first.
    """
    from fairseq.data import data_utils

    if getattr(data_utils.batch_by_size, "_deepnet_keeps_last", False):
        return
    fairseq_batch_by_size = data_utils.batch_by_size
    signature = inspect.signature(fairseq_batch_by_size)

    @functools.wraps(fairseq_batch_by_size)
    def batch_by_size(*args, **kwargs):
        batches = fairseq_batch_by_size(*args, **kwargs)
        arguments = signature.bind(*args, **kwargs).arguments
        if arguments.get("fixed_shapes") is not None:
            return batches
        indices = arguments["indices"]
        covered = sum(len(batch) for batch in batches)
        if covered < len(indices):
            batches = list(batches) + [indices[covered:]]
        return batches

    batch_by_size._deepnet_keeps_last = True
    data_utils.batch_by_size = batch_by_size


# fairseq modules (outside examples/) whose ``np`` uses a name NumPy removed; see the notes above.
FAIRSEQ_MODULES_USING_REMOVED_NUMPY = (
    "fairseq.data.data_utils",
    "fairseq.data.token_block_dataset",
    "fairseq.data.language_pair_dataset",
    "fairseq.modules.dynamic_crf_layer",
)


class FairseqNumpy:
    """NumPy as fairseq's older code expects it; everything else is looked up on ``numpy`` itself.

    ``int``, ``float`` and ``compat.long`` are what NumPy 1.x defined them as (the Python builtins;
    ``numpy.compat.long`` was ``int``).
    """

    int = int
    float = float
    compat = types.SimpleNamespace(long=int)

    def __getattr__(self, name: str) -> Any:
        return getattr(numpy, name)

    @staticmethod
    def percentile(a: Any, q: Any, *args: Any, interpolation: str | None = None, **kwargs: Any) -> Any:
        """``numpy.percentile`` that also takes the ``interpolation=`` keyword (``method=`` since NumPy 1.22)."""
        if interpolation is not None:
            if "method" in kwargs:
                raise TypeError("percentile() got both 'interpolation' and 'method'; pass only 'method'")
            kwargs["method"] = interpolation
        return numpy.percentile(a, q, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<deepnet_fairseq view of numpy {numpy.__version__}>"


FAIRSEQ_NUMPY = FairseqNumpy()


def install_numpy2_names() -> None:
    """Give each module in ``FAIRSEQ_MODULES_USING_REMOVED_NUMPY`` the :class:`FairseqNumpy` view (idempotent)."""
    for name in FAIRSEQ_MODULES_USING_REMOVED_NUMPY:
        module = importlib.import_module(name)
        if getattr(module, "np", None) is numpy:
            module.np = FAIRSEQ_NUMPY
