"""Loud, precise divergence reports for deep training runs.

fairseq stops a run whose gradients become NaN/inf (fp32) or whose fp16 loss scale hits its minimum
with a ``FloatingPointError`` traceback.  For models of this plugin the trainer's ``train_step`` is
wrapped so that, before that happens, one message names the update, the residual scheme, the depth,
the learning rate and the last good checkpoint (which fairseq never overwrites here; it writes the
diverged state to ``crash.pt``).

``--stop-on-divergence-patience P`` turns divergence into a clean exit with
:data:`DIVERGED_EXIT_CODE` (no traceback), for sweeps: the run stops when an update raises
``FloatingPointError`` or when P consecutive updates are skipped (fp16 overflow) or report a
non-finite loss.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time
from typing import Optional

logger = logging.getLogger(__name__)

DIVERGED_EXIT_CODE = 3


def _option(cfg, name: str, default=None):
    value = getattr(cfg, name, None)
    return default if value is None else value


class DivergenceGuard:
    """Per-trainer state: consecutive bad updates and how to describe the run."""

    def __init__(self, trainer):
        self.patience = int(_option(trainer.cfg.model, "stop_on_divergence_patience", 0))
        model = trainer.get_model()
        encoder = getattr(model, "encoder", None)
        depth = f"{len(encoder.layers)}L-" if encoder is not None else ""
        self.description = f"{depth}{len(model.decoder.layers)}L, scheme {model.decoder.scheme.describe()}"
        self.save_dir = trainer.cfg.checkpoint.save_dir
        self.bad_updates = 0

    def last_good_checkpoint(self) -> str:
        path = os.path.join(self.save_dir, "checkpoint_last.pt")
        if not os.path.exists(path):
            return f"none yet in {self.save_dir}"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(path)))
        return f"{path} (written {stamp}, left untouched)"

    def report(self, trainer, reason: str) -> str:
        hint = "Try a lower --lr, a longer --warmup-updates or a larger batch"
        if "deepnorm(" not in self.description:
            hint += ", or --residual-scheme deepnorm"
        message = (
            f"Training diverged at update {trainer.get_num_updates() + 1} ({self.description}, "
            f"lr {trainer.get_lr():.3g}): {reason}. Last good checkpoint: {self.last_good_checkpoint()}; "
            f"fairseq saves the diverged state as {os.path.join(self.save_dir, 'crash.pt')}. {hint}."
        )
        logger.error(message)
        return message

    def stop(self, trainer, reason: str) -> None:
        self.report(trainer, reason)
        sys.stderr.flush()
        raise SystemExit(DIVERGED_EXIT_CODE)

    def observe(self, trainer, logging_output: Optional[dict]) -> None:
        loss = None if logging_output is None else logging_output.get("loss")
        if logging_output is not None and (loss is None or math.isfinite(float(loss))):
            self.bad_updates = 0
            return
        self.bad_updates += 1
        if self.patience and self.bad_updates >= self.patience:
            what = "loss is NaN/inf" if logging_output is not None else "update skipped (gradient overflow)"
            self.stop(trainer, f"{what} for {self.bad_updates} consecutive updates")


def _guard(trainer) -> Optional[DivergenceGuard]:
    guard = getattr(trainer, "_deepnet_divergence_guard", None)
    if guard is None:
        decoder = getattr(trainer.get_model(), "decoder", None)
        if getattr(decoder, "scheme", None) is None:  # not one of this plugin's models
            return None
        guard = DivergenceGuard(trainer)
        trainer._deepnet_divergence_guard = guard
    return guard


def _leaf_backward_nan_detector():
    from fairseq.nan_detector import NanDetector

    class LeafBackwardNanDetector(NanDetector):
        """fairseq's NanDetector with backward hooks on leaf modules only.

        On a FloatingPointError fairseq re-runs the step under NanDetector, which puts a backward
        hook on every module; on PyTorch 2.x a module returning a dict without tensors (the
        Transformer encoder) then fails with ``StopIteration`` and hides the real error.
        """

        def add_hooks(self, module):
            if self.forward:
                self.fhooks.append(module.register_forward_hook(self.fhook_fn))
            if self.backward and next(module.children(), None) is None:
                self.bhooks.append(module.register_backward_hook(self.bhook_fn))

    return LeafBackwardNanDetector


def install_divergence_guard() -> None:
    """Wrap ``fairseq.trainer.Trainer.train_step`` (idempotent; other models pass through) and make
    fairseq's NaN diagnosis work on PyTorch 2.x."""
    from fairseq import trainer as fairseq_trainer
    from fairseq.trainer import Trainer

    if getattr(Trainer.train_step, "_deepnet_guard", False):
        return
    fairseq_trainer.NanDetector = _leaf_backward_nan_detector()
    fairseq_train_step = Trainer.train_step

    @functools.wraps(fairseq_train_step)
    def train_step(self, samples, raise_oom=False):
        guard = _guard(self)
        if guard is None:
            return fairseq_train_step(self, samples, raise_oom)
        try:
            logging_output = fairseq_train_step(self, samples, raise_oom)
        except FloatingPointError as err:
            reason = str(err).splitlines()[0]
            if guard.patience:
                guard.stop(self, reason)
            guard.report(self, reason)
            raise
        guard.observe(self, logging_output)
        return logging_output

    train_step._deepnet_guard = True
    Trainer.train_step = train_step
