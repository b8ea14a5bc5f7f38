"""Loud, precise divergence reports for deep training runs.

fairseq stops a run whose gradients become NaN/inf (fp32) or whose fp16 loss scale hits its minimum
with a ``FloatingPointError`` traceback.  For models of this plugin the trainer's ``train_step`` is
wrapped so that, before that happens, one message names the update, the residual scheme, the depth,
the learning rate and the last good checkpoint (which fairseq never overwrites here; it writes the
diverged state to ``crash.pt``).

A checkpoint is only called good on evidence (:meth:`DivergenceGuard.judge_checkpoint`).  The guard
records the training loss of every update it sees; the loss of update ``u`` is *unhealthy* when it
is NaN/inf or more than :data:`EXPLODING_LOSS_FACTOR` times the lowest training loss seen up to
``u`` (an order of magnitude above the best is no batch-to-batch noise).  A checkpoint saved after
update ``k`` (its ``optimizer_history[-1]['num_updates']``) is *known good* when

* its recorded validation score (``extra_state['val_loss']``), if any, is finite, and
* the losses of updates ``k`` (the step that produced it) and ``k + 1`` (computed with exactly its
  parameters), where this run saw them, are healthy, and
* there is some evidence: a recorded validation score or a training loss of update ``k`` or
  ``k + 1`` seen by this run.

The report walks back from ``checkpoint_last.pt`` through ``checkpoint_E_U.pt`` and ``checkpointE.pt``
(newest first) to ``checkpoint_best.pt`` and names the first known-good one, or says that none is
known to be good and what is known about each.

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
import re
import sys
import time
from typing import Dict, List, Optional, Tuple

from deepnet_fairseq.checkpoints import load_checkpoint
from deepnet_fairseq.stability import model_stacks

logger = logging.getLogger(__name__)

DIVERGED_EXIT_CODE = 3

# a training loss above this factor times the lowest one seen so far is "exploding"
EXPLODING_LOSS_FACTOR = 10.0


def _option(cfg, name: str, default=None):
    value = getattr(cfg, name, None)
    return default if value is None else value


def _checkpoint_order(name: str, suffix: str) -> Optional[Tuple[float, float]]:
    """``(epoch, updates)`` of ``checkpoint_E_U.pt`` / ``checkpointE.pt`` (end of epoch E: after every
    ``checkpoint_E_U.pt``), None for other files."""
    match = re.fullmatch(r"checkpoint(?:_(\d+)_(\d+)|(\d+))" + re.escape(suffix) + r"\.pt", name)
    if match is None:
        return None
    epoch, updates, end_of_epoch = match.groups()
    if end_of_epoch is not None:
        return float(end_of_epoch), math.inf
    return float(epoch), float(updates)


class DivergenceGuard:
    """Per-trainer state: consecutive bad updates, the training losses seen, how to describe the run."""

    def __init__(self, trainer):
        self.patience = int(_option(trainer.cfg.model, "stop_on_divergence_patience", 0))
        stacks = model_stacks(trainer.get_model())
        depth = "-".join(f"{len(stack.layers)}L" for stack in stacks.values())
        described = {side: stack.scheme.describe() for side, stack in stacks.items()}
        if len(set(described.values())) == 1:
            self.description = f"{depth}, scheme {next(iter(described.values()))}"
        else:
            self.description = f"{depth}, " + ", ".join(f"{side} scheme {text}" for side, text in described.items())
        # what the schemes suggest beyond lr/warm-up/batch (DeepNorm: nothing), each once
        self.hints = list(dict.fromkeys(
            hint for hint in (stack.scheme.divergence_hint() for stack in stacks.values()) if hint is not None))
        self.save_dir = trainer.cfg.checkpoint.save_dir
        self.suffix = _option(trainer.cfg.checkpoint, "checkpoint_suffix", "")
        self.metric = _option(trainer.cfg.checkpoint, "best_checkpoint_metric", "loss")  # what val_loss holds
        self.bad_updates = 0
        self.lowest_loss = math.inf
        self.first_seen: Optional[int] = None  # first and last update whose training loss was seen
        self.last_seen: Optional[int] = None
        # update -> (its non-finite or exploding training loss, the lowest loss seen up to it)
        self.unhealthy: Dict[int, Tuple[float, float]] = {}

    def record_loss(self, update: int, loss: float) -> None:
        """Remember the training loss of ``update`` and whether it is healthy (finite, not exploding)."""
        if self.first_seen is None:
            self.first_seen = update
        self.last_seen = update
        if math.isfinite(loss):
            self.lowest_loss = min(self.lowest_loss, loss)
        exploding = self.lowest_loss > 0 and loss > EXPLODING_LOSS_FACTOR * self.lowest_loss
        if math.isfinite(loss) and not exploding:
            self.unhealthy.pop(update, None)
        else:
            self.unhealthy[update] = (loss, self.lowest_loss)

    def candidate_checkpoints(self) -> List[str]:
        """Checkpoints in ``save_dir``, newest first: last, ``checkpoint_E_U``/``checkpointE``, best."""
        names = os.listdir(self.save_dir) if os.path.isdir(self.save_dir) else []
        numbered = sorted(
            (name for name in names if _checkpoint_order(name, self.suffix) is not None),
            key=lambda name: _checkpoint_order(name, self.suffix),
            reverse=True,
        )
        ordered = [f"checkpoint_last{self.suffix}.pt", *numbered, f"checkpoint_best{self.suffix}.pt"]
        return [os.path.join(self.save_dir, name) for name in ordered if name in names]

    def judge_checkpoint(self, path: str) -> Tuple[bool, str]:
        """``(known good, what is known)`` for one checkpoint file; see the module docstring."""
        try:
            state = load_checkpoint(path, mmap=True)  # counters only: the weights are mapped, not read
            updates = int(state["optimizer_history"][-1]["num_updates"])
        except (RuntimeError, OSError, KeyError, IndexError, TypeError) as err:
            return False, f"unreadable ({type(err).__name__}: {err})"
        val_loss = (state.get("extra_state") or {}).get("val_loss")
        facts = [f"update {updates}"]
        good = True
        if val_loss is not None:
            good = math.isfinite(float(val_loss))
            facts.append(f"valid {self.metric} {float(val_loss):.4g}")
        seen = [u for u in (updates, updates + 1) if self.first_seen is not None and
                self.first_seen <= u <= self.last_seen]
        for update in seen:
            if update in self.unhealthy:
                good = False
                loss, lowest = self.unhealthy[update]
                why = f" over {EXPLODING_LOSS_FACTOR:g}x the lowest up to then ({lowest:.4g})"
                facts.append(f"training loss {loss:.4g} at update {update}{why if math.isfinite(loss) else ''}")
        if val_loss is None and not seen:
            facts.append("no validation score recorded and no training loss of it seen by this run")
            return False, ", ".join(facts)
        if good and seen:
            facts.append(f"training loss healthy at update {' and '.join(map(str, seen))}")
        return good, ", ".join(facts)

    def last_good_checkpoint(self) -> str:
        """The newest known-good checkpoint with what makes it good, or what is known of each."""
        known: List[str] = []
        described: Dict[str, str] = {}  # facts -> the newest file they describe (copies repeat them)
        for path in self.candidate_checkpoints():
            good, facts = self.judge_checkpoint(path)
            if good:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(path)))
                return f"{path} ({facts}; written {stamp}, left untouched)"
            name = os.path.basename(path)
            known.append(f"{name} (as {described[facts]})" if facts in described else f"{name} ({facts})")
            described.setdefault(facts, name)
        if not known:
            return f"none yet in {self.save_dir}"
        return f"no checkpoint known to be good in {self.save_dir}: {'; '.join(known)}"

    def report(self, trainer, reason: str) -> str:
        hint = "Try a lower --lr, a longer --warmup-updates or a larger batch"
        hint += "".join(f", or {scheme_hint}" for scheme_hint in self.hints)
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
        """Count a skipped or non-finite update (stopping after ``patience``) and record its loss."""
        loss = None if logging_output is None else logging_output.get("loss")
        if loss is not None:
            self.record_loss(trainer.get_num_updates(), float(loss))
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
        if not model_stacks(trainer.get_model()):  # not one of this plugin's models
            return None
        guard = DivergenceGuard(trainer)
        trainer._deepnet_divergence_guard = guard
    return guard


def _leaf_backward_nan_detector():
    from fairseq.nan_detector import NanDetector

    class LeafBackwardNanDetector(NanDetector):
        """fairseq's NanDetector; for this plugin's models with backward hooks on leaf modules only.

        On a FloatingPointError fairseq re-runs the step under NanDetector, which puts a backward
        hook on every module; on PyTorch 2.x a module returning a dict without tensors (the
        Transformer encoder) then fails with ``StopIteration`` and hides the real error.  Other
        models (fairseq's own) get fairseq's hooks unchanged.
        """

        def __init__(self, model, forward=True, backward=True):
            self.leaf_backward_only = bool(model_stacks(model))  # read by add_hooks, which __init__ calls
            super().__init__(model, forward=forward, backward=backward)

        def add_hooks(self, module):
            if not self.leaf_backward_only:
                super().add_hooks(module)
                return
            if self.forward:
                self.fhooks.append(module.register_forward_hook(self.fhook_fn))
            if self.backward and next(module.children(), None) is None:
                self.bhooks.append(module.register_backward_hook(self.bhook_fn))

    LeafBackwardNanDetector._deepnet_leaf_backward = True
    return LeafBackwardNanDetector


def install_nan_detector() -> None:
    """Make the NanDetector that ``fairseq.trainer`` uses put backward hooks only on the leaf modules
    of this plugin's models (idempotent; other models keep fairseq's behaviour)."""
    from fairseq import trainer as fairseq_trainer

    if getattr(fairseq_trainer.NanDetector, "_deepnet_leaf_backward", False):
        return
    fairseq_trainer.NanDetector = _leaf_backward_nan_detector()


def install_divergence_guard() -> None:
    """Wrap ``fairseq.trainer.Trainer.train_step`` (idempotent; other models pass through)."""
    from fairseq.trainer import Trainer

    if getattr(Trainer.train_step, "_deepnet_guard", False):
        return
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
