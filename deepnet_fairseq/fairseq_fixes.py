"""Every change this plugin makes to fairseq (and torch) at run time, as one guarded unit.

:data:`FIXES` lists each fix as data: its name, the function or global it replaces (``target``), why
(``reason``), what switching it off means, the fairseq version it was checked against, an
``applies()`` check that its target still looks as the fix expects, and the function that installs
it (kept with the code of its concept: :mod:`deepnet_fairseq.checkpoints`, ``divergence``, ``compat``,
``scheme_record``).  :func:`install_fixes` installs them once per process and logs one INFO line naming
the active ones.

* Version guard: a fix is installed on the fairseq version it was checked against (``checked_with``,
  :data:`CHECKED_FAIRSEQ_VERSION` for all of them today); on another version a WARNING is logged and
  only the fixes whose ``applies()`` holds are installed (the skipped ones are named).
* ``DEEPNET_FAIRSEQ_FIXES=off`` installs none; ``DEEPNET_FAIRSEQ_FIXES=-name1,-name2`` all but
  those.  Each fix switched off is named in a WARNING saying what is lost.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import os
from typing import Callable, List, Optional, Sequence, Set, Tuple

from deepnet_fairseq.compat import FAIRSEQ_MODULES_USING_REMOVED_NUMPY

logger = logging.getLogger(__name__)

CHECKED_FAIRSEQ_VERSION = "0.12.3.1"
"""The fairseq version (fairseq-fixed) every fix was written and tested against."""

ENV_VAR = "DEEPNET_FAIRSEQ_FIXES"


@dataclasses.dataclass(frozen=True)
class Fix:
    """One change to fairseq/torch: what it replaces, why, and how to install it."""

    name: str
    target: str
    reason: str
    off_effect: str
    """What a run loses when the fix is switched off (logged as a WARNING then)."""
    applies: Callable[[], bool]
    """Whether ``target`` still looks as the fix expects (consulted on an unchecked fairseq version)."""
    install: Callable[[], None]
    """Installs the fix; idempotent."""
    checked_with: str = CHECKED_FAIRSEQ_VERSION


def _resolve(target: str) -> object:
    """The object a dotted ``target`` names (longest importable module, then attributes); None if missing."""
    parts = target.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute, None)
        return found
    return None


def _parameter_names(target: str) -> Optional[List[str]]:
    """Names of the parameters of the callable ``target`` names (None when it is missing or not callable)."""
    found = _resolve(target)
    if not callable(found):
        return None
    try:
        return list(inspect.signature(found).parameters)
    except (TypeError, ValueError):
        return None


def _takes(target: str, *names: str, exact: bool = False) -> Callable[[], bool]:
    """``applies()`` check: ``target`` is a callable taking the parameters ``names`` (exactly, in order,
    when ``exact``)."""

    def applies() -> bool:
        found = _parameter_names(target)
        if found is None:
            return False
        return found == list(names) if exact else set(names) <= set(found)

    return applies


def _installer(module: str, function: str) -> Callable[[], None]:
    """Install function ``module.function``, imported when called (the package imports no fairseq by itself)."""

    def install() -> None:
        getattr(importlib.import_module(module), function)()

    install.__qualname__ = f"{module}.{function}"
    return install


def _install_checkpoint_allowlist() -> None:
    from deepnet_fairseq import checkpoints

    checkpoints.install_checkpoint_allowlist()
    if checkpoints._TensorPlaceholder is None:
        logger.warning(
            "fairseq.distributed.utils._TensorPlaceholder is missing from this fairseq: the checkpoint allow-list "
            "lacks it, so torch's safe loader may refuse the state rank 0 broadcasts on a multi-process resume"
        )


def _nan_detector_applies() -> bool:
    """fairseq.trainer uses a NanDetector that takes (model, forward, backward), calls ``add_hooks``
    per module and keeps its hooks in ``fhooks``/``bhooks``."""
    import torch

    detector_class = _resolve("fairseq.nan_detector.NanDetector")
    if _resolve("fairseq.trainer.NanDetector") is None or not callable(getattr(detector_class, "add_hooks", None)):
        return False
    if _parameter_names("fairseq.nan_detector.NanDetector.__init__") != ["self", "model", "forward", "backward"]:
        return False
    detector = detector_class(torch.nn.Linear(1, 1))
    try:
        return all(hasattr(detector, name) for name in ("fhooks", "bhooks", "forward", "backward", "fhook_fn",
                                                         "bhook_fn"))
    finally:
        detector.close()


def _numpy2_names_apply() -> bool:
    """Each module patched by the fix exists and uses NumPy through its global ``np``."""
    return all(hasattr(_resolve(name), "np") for name in FAIRSEQ_MODULES_USING_REMOVED_NUMPY)


FIXES: Tuple[Fix, ...] = (
    Fix(
        name="checkpoint_allowlist",
        target="torch.serialization.add_safe_globals",
        reason="torch >= 2.6 loads with weights_only=True, which refuses the few non-tensor objects fairseq "
               "checkpoints hold; they are allowed by name (deepnet_fairseq.checkpoints.CHECKPOINT_GLOBALS)",
        off_effect="fairseq's own loading (resume, fairseq-generate, hub) refuses checkpoints holding a "
                   "configuration or numpy metrics",
        applies=lambda: callable(_resolve("torch.serialization.add_safe_globals")),
        install=_install_checkpoint_allowlist,
    ),
    Fix(
        name="atomic_checkpoint_copy",
        target="fairseq.file_io.PathManager.copy",
        reason="fairseq copies checkpoint_last.pt/checkpoint_best.pt in place; a kill mid-copy leaves a "
               "truncated file that resume fails on; local copies become temporary file + rename",
        off_effect="a run killed while copying checkpoint_last.pt can leave it truncated",
        applies=lambda: (_takes("fairseq.file_io.PathManager.copy", "src_path", "dst_path", "overwrite")()
                         and callable(_resolve("fairseq.file_io.PathManager.path_requires_pathmanager"))),
        install=_installer("deepnet_fairseq.checkpoints", "install_atomic_checkpoint_copy"),
    ),
    Fix(
        name="checkpoint_load_errors",
        target="fairseq.checkpoint_utils.load_checkpoint_to_cpu",
        reason="a truncated/corrupt/refused checkpoint raises an error naming the file; the loaded state "
               "carries the checkpoint's residual-scheme record for the scheme-record check",
        off_effect="unreadable checkpoints fail with torch's error without the file name, and no "
                   "residual-scheme record reaches the scheme-record check (it then checks nothing)",
        applies=_takes("fairseq.checkpoint_utils.load_checkpoint_to_cpu", "path", "arg_overrides",
                       "load_on_all_ranks", exact=True),
        install=_installer("deepnet_fairseq.checkpoints", "install_checkpoint_load_errors"),
    ),
    Fix(
        name="record_broadcast",
        target="fairseq.distributed.utils.broadcast_object",
        reason="a checkpoint state broadcast to the other ranks on a multi-process resume gets its "
               "residual-scheme record back on its weights",
        off_effect="on a multi-process resume the scheme-record check is skipped",
        applies=_takes("fairseq.distributed.utils.broadcast_object", "obj"),
        install=_installer("deepnet_fairseq.checkpoints", "install_record_broadcast"),
    ),
    Fix(
        name="divergence_guard",
        target="fairseq.trainer.Trainer.train_step",
        reason="a diverging run of this plugin's models is reported with update, scheme, depth, lr and the "
               "last good checkpoint; --stop-on-divergence-patience stops it cleanly",
        off_effect="divergence shows only fairseq's FloatingPointError and --stop-on-divergence-patience "
                   "does nothing",
        applies=_takes("fairseq.trainer.Trainer.train_step", "self", "samples", "raise_oom", exact=True),
        install=_installer("deepnet_fairseq.divergence", "install_divergence_guard"),
    ),
    Fix(
        name="nan_detector",
        target="fairseq.trainer.NanDetector",
        reason="fairseq's NaN diagnosis hooks backward on every module, which fails on PyTorch 2.x for this "
               "plugin's models (StopIteration hides the real error); they get leaf-only backward hooks, "
               "other models keep fairseq's",
        off_effect="a NaN/inf gradient in this plugin's models can end in a StopIteration that hides it",
        applies=_nan_detector_applies,
        install=_installer("deepnet_fairseq.divergence", "install_nan_detector"),
    ),
    Fix(
        name="keep_last_batch",
        target="fairseq.data.data_utils.batch_by_size",
        reason="fairseq main drops the last batch when its size is not a multiple of "
               "--required-batch-size-multiple (0.12.2 kept it): generate/validate skip sentences",
        off_effect="fairseq-generate and validation silently skip the last sentences of a set",
        applies=_takes("fairseq.data.data_utils.batch_by_size", "indices", "required_batch_size_multiple",
                       "fixed_shapes"),
        install=_installer("deepnet_fairseq.compat", "install_keep_last_batch"),
    ),
    Fix(
        name="numpy2_names",
        target=", ".join(f"{name}.np" for name in FAIRSEQ_MODULES_USING_REMOVED_NUMPY),
        reason="these fairseq modules use names NumPy 2 removed (np.compat.long, np.int, np.float, "
               "percentile(interpolation=)); each gets a NumPy view that still has them",
        off_effect="language-model sampling/scoring, --num-batch-buckets and the CRF fail on NumPy 2",
        applies=_numpy2_names_apply,
        install=_installer("deepnet_fairseq.compat", "install_numpy2_names"),
    ),
    Fix(
        name="scheme_record_check",
        target="fairseq.models.fairseq_model.BaseFairseqModel.load_state_dict",
        reason="loading a checkpoint into a model built with another residual scheme (same weights, "
               "different network) is refused",
        off_effect="a checkpoint trained with another residual scheme loads silently and computes a "
                   "different network",
        applies=_takes("fairseq.models.fairseq_model.BaseFairseqModel.load_state_dict", "self", "state_dict",
                       "strict", "model_cfg", "args", exact=True),
        install=_installer("deepnet_fairseq.scheme_record", "install_record_check"),
    ),
)

_active: Optional[Tuple[str, ...]] = None  # names of the fixes installed in this process, once decided


def switched_off(setting: str, names: Sequence[str]) -> Set[str]:
    """The fix names a :data:`ENV_VAR` value switches off: ``""`` none, ``off`` all, ``-a,-b`` those.

    Raises ``ValueError`` naming the variable and the allowed names for anything else.
    """
    setting = setting.strip()
    if not setting:
        return set()
    if setting == "off":
        return set(names)
    off = set()
    for item in setting.split(","):
        item = item.strip()
        if not item.startswith("-") or item[1:] not in names:
            raise ValueError(
                f"{ENV_VAR}={setting!r}: {item!r} is not a fix to switch off; use 'off' (no fixes) or a "
                f"comma-separated list of -name with names from: {', '.join(names)}"
            )
        off.add(item[1:])
    return off


def install_fixes() -> Tuple[str, ...]:
    """Install the fixes of :data:`FIXES` (once per process) and return the names of the active ones.

    The first call decides: it reads :data:`ENV_VAR`, checks ``fairseq.__version__`` against
    :data:`CHECKED_FAIRSEQ_VERSION` (on another version only fixes whose ``applies()`` holds are
    installed), installs, and logs one INFO line; later calls return the same names.
    Raises ``ValueError`` for a malformed :data:`ENV_VAR`.
    """
    global _active
    if _active is not None:
        return _active
    import fairseq

    names = [fix.name for fix in FIXES]
    off = switched_off(os.environ.get(ENV_VAR, ""), names)
    for fix in FIXES:
        if fix.name in off:
            logger.warning("fairseq fix %s (%s) is switched off by %s: %s", fix.name, fix.target, ENV_VAR,
                           fix.off_effect)
    chosen = [fix for fix in FIXES if fix.name not in off]
    version = getattr(fairseq, "__version__", "unknown")
    unchecked = [fix for fix in chosen if fix.checked_with != version]
    if unchecked:
        skipped = [fix for fix in unchecked if not fix.applies()]
        chosen = [fix for fix in chosen if fix not in skipped]
        logger.warning(
            "fairseq %s is not the version deepnet_fairseq's fixes were checked against (%s): installing "
            "only those whose target still looks as expected; skipped: %s", version,
            ", ".join(sorted({fix.checked_with for fix in unchecked})),
            ", ".join(f"{fix.name} ({fix.target})" for fix in skipped) or "none",
        )
    for fix in chosen:
        fix.install()
    _active = tuple(fix.name for fix in chosen)
    logger.info("fairseq fixes active (fairseq %s): %s", version, ", ".join(_active) or "none")
    return _active
