"""Safe loading and averaging of fairseq checkpoints on PyTorch >= 2.6.

Since PyTorch 2.6 ``torch.load`` defaults to ``weights_only=True``, which refuses the few
non-tensor objects fairseq pickles into checkpoints.  Instead of turning the safe unpickler off, we
register exactly those classes with ``torch.serialization.add_safe_globals``; any other global
(``os.system``, ``eval``, ...) is still refused by torch before anything runs.

:data:`CHECKPOINT_GLOBALS` is the union of what real checkpoints contain, listed with
``torch.serialization.get_unsafe_globals_in_checkpoint`` (``deepnet-checkpoint-globals``):

* ``argparse.Namespace``: ``cfg.model`` of every ``fairseq-train`` run (and ``args`` of
  argparse-era checkpoints);
* numpy ``ndarray``/``dtype``/``_reconstruct``/``scalar``: metric meters in ``extra_state`` once
  ``--eval-bleu`` logs its n-gram counts as numpy arrays;
* OmegaConf ``DictConfig``/``ListConfig`` with their ``AnyNode``/``Metadata``/``ContainerMetadata``
  and the ``typing.Any``/``dict``/``list``/``int``/``defaultdict`` they reference: checkpoints whose
  ``cfg`` was saved as an OmegaConf container (fairseq 0.10-0.11, some released models);
* ``fairseq.distributed.utils._TensorPlaceholder``: not in files, but in the state rank 0 broadcasts
  to the other ranks on a multi-process resume (``torch.load`` of a buffer).

``fairseq-train`` with EMA, ``--keep-best-checkpoints`` and ``fairseq-hydra-train`` add nothing
beyond these (checked by the test suite on real runs).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import pickle
import secrets
import shutil
import typing
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterable, List, Sequence, Set, Union

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode

from deepnet_fairseq.scheme_record import (
    RECORD_STATE_KEY,
    SchemeMismatchError,
    architecture,
    attach_record,
    describe,
    record_from_model_config,
    records_match,
    stored_model_config,
)
from deepnet_fairseq.schemes import DeepNetConfigError

try:  # fairseq-private: checked by the "checkpoint_allowlist" fix (deepnet_fairseq.fairseq_fixes)
    from fairseq.distributed.utils import _TensorPlaceholder
except ImportError:  # another fairseq: the allow-list lacks it, and the fix says so
    _TensorPlaceholder = None

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar

PathLike = Union[str, os.PathLike]

# numpy pickles an array's dtype as its dtype class (numpy.dtypes.Int64DType, ...), which the scan of
# globals does not list; allow the numeric ones (numpy >= 1.25 has one class per dtype).
NUMPY_DTYPE_CLASSES = tuple(
    {type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                 np.uint32, np.uint64, np.float16, np.float32, np.float64)}
    - {np.dtype}
)

CHECKPOINT_GLOBALS: tuple = (
    argparse.Namespace,
    # numpy arrays and scalars (metric meters); numpy 1.x checkpoints name numpy.core
    np.ndarray,
    np.dtype,
    _reconstruct,
    scalar,
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    (scalar, "numpy.core.multiarray.scalar"),
    *NUMPY_DTYPE_CLASSES,
    # OmegaConf containers (cfg saved as DictConfig)
    DictConfig,
    ListConfig,
    ContainerMetadata,
    Metadata,
    AnyNode,
    typing.Any,
    dict,
    list,
    int,
    collections.defaultdict,
    # multi-process resume: rank 0 broadcasts the loaded state with its tensors replaced by
    # placeholders, and the other ranks unpickle it with torch.load
    *((_TensorPlaceholder,) if _TensorPlaceholder is not None else ()),
)


def install_checkpoint_allowlist() -> None:
    """Allow ``torch.load(weights_only=True)`` to rebuild fairseq checkpoints (idempotent)."""
    torch.serialization.add_safe_globals(list(CHECKPOINT_GLOBALS))


def checkpoint_globals(path: PathLike) -> Set[str]:
    """Names of the globals a checkpoint needs beyond torch's defaults, without unpickling it."""
    return set(torch.serialization.get_unsafe_globals_in_checkpoint(os.fspath(path)))


def load_checkpoint(path: PathLike, mmap: bool = False) -> dict:
    """Load a checkpoint on CPU through the safe (``weights_only=True``) unpickler.

    ``mmap=True`` maps the tensors' storage instead of reading it (zip-format files, torch >= 1.6; other
    files are read): cheap when only the configuration or counters are needed.
    """
    install_checkpoint_allowlist()
    try:
        mmap = mmap and zipfile.is_zipfile(os.fspath(path))
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises UnpicklingError/RuntimeError for refused or corrupt files
        raise RuntimeError(f"cannot load checkpoint {os.fspath(path)}: {err}") from err


def average_state_dicts(states: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Elementwise mean of model state dicts with identical keys and shapes.

    Floating-point tensors are summed in float64 and cast back to their dtype; other tensors must
    be equal in every input (they are counters or indices, whose mean would be meaningless).
    """
    if not states:
        raise ValueError("need at least one state dict to average")
    keys = list(states[0].keys())
    for index, state in enumerate(states[1:], start=1):
        if list(state.keys()) != keys:
            missing = set(keys) ^ set(state.keys())
            raise ValueError(f"checkpoint {index} has different parameters: {sorted(missing)[:5]}")
    averaged: Dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = [state[key] for state in states]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"parameter {key} has different shapes across checkpoints: {sorted(shapes)}")
        if tensors[0].is_floating_point():
            total = torch.zeros_like(tensors[0], dtype=torch.float64)
            for tensor in tensors:
                total += tensor.to(torch.float64)
            averaged[key] = (total / len(tensors)).to(tensors[0].dtype)
        else:
            if any(not torch.equal(tensors[0], t) for t in tensors[1:]):
                raise ValueError(f"non-floating parameter {key} differs across checkpoints; cannot average")
            averaged[key] = tensors[0].clone()
    return averaged


def average_checkpoints(inputs: Iterable[PathLike], output: PathLike) -> dict:
    """Average the ``model`` weights of fairseq checkpoints into ``output`` (written atomically).

    Every input is loaded through :func:`load_checkpoint`; every other field (``cfg``, optimizer
    state, ...) is the first input's, as in fairseq's ``scripts/average_checkpoints.py``.
    ``output`` may not be one of the inputs.
    """
    paths: List[Path] = [Path(p) for p in inputs]
    out = Path(output)
    if not paths:
        raise ValueError("no input checkpoints given")
    if any(out.resolve() == p.resolve() for p in paths):
        raise ValueError(f"output {out} is also an input; refusing to overwrite it")
    states = [load_checkpoint(p) for p in paths]
    for path, state in zip(paths, states, strict=True):
        if "model" not in state:
            raise ValueError(f"{path} is not a fairseq checkpoint (no 'model' entry)")
    check_same_network(paths, states)
    result = dict(states[0])
    result["model"] = average_state_dicts([s["model"] for s in states])
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: torch.save(result, f))
    return result


def check_same_network(paths: Sequence[Path], states: Sequence[dict]) -> None:
    """Refuse to average checkpoints of different architectures or residual schemes (constants included).

    Raises :class:`~deepnet_fairseq.scheme_record.SchemeMismatchError` naming the two files and settings.
    """
    first_cfg = stored_model_config(states[0])
    first_arch, first_record = architecture(first_cfg), record_from_model_config(first_cfg)
    for path, state in zip(paths[1:], states[1:], strict=True):
        cfg = stored_model_config(state)
        arch, record = architecture(cfg), record_from_model_config(cfg)
        if arch != first_arch:
            raise SchemeMismatchError(
                f"{paths[0]} is --arch {first_arch} but {path} is --arch {arch}: cannot average different models"
            )
        if (record is None) != (first_record is None) or (record and not records_match(first_record, record)):
            raise SchemeMismatchError(
                f"{paths[0]} was trained with {describe(first_record or {})} but {path} with "
                f"{describe(record or {})}: cannot average networks that compute different functions"
            )


class CheckpointLoadError(RuntimeError):
    """A checkpoint file that cannot be read: truncated, corrupt, or refused by the safe unpickler."""


def atomic_copy(src: PathLike, dst: PathLike) -> None:
    """Copy ``src`` to ``dst`` so that ``dst`` is always either its old or its complete new content.

    The bytes go to a temporary file in ``dst``'s directory, are flushed to disk, and replace ``dst``
    with one ``os.replace`` (atomic on POSIX); a crash at any moment leaves no partial ``dst``.
    """
    with open(src, "rb") as inp:
        atomic_write(dst, lambda out: shutil.copyfileobj(inp, out, length=16 * 1024 * 1024))


def atomic_write(dst: PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write ``dst`` through ``write(file)`` into a temporary file in the same directory, flush it to
    disk and ``os.replace`` it over ``dst``: a crash leaves either the old or the complete new file.

    The file gets the permissions of any newly written file (0666 less the process umask, as
    ``torch.save`` to a path gives), not ``tempfile.mkstemp``'s owner-only 0600."""
    dst = os.fspath(dst)
    tmp = os.path.join(os.path.dirname(dst) or ".", f"{os.path.basename(dst)}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def install_atomic_checkpoint_copy() -> None:
    """Make fairseq's copies of checkpoints atomic (idempotent).

    fairseq writes ``checkpointE.pt`` atomically (temporary file + rename) but then *copies* it to
    ``checkpoint_last.pt``/``checkpoint_best.pt`` with ``shutil.copyfile``, so a kill during that copy
    leaves a truncated ``checkpoint_last.pt`` that resume then fails on.  Local copies go through
    :func:`atomic_copy` instead (remote ioPath URLs keep fairseq's behaviour).
    """
    from fairseq.file_io import PathManager

    if getattr(PathManager.copy, "_deepnet_safe", False):
        return
    fairseq_copy = PathManager.copy

    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if PathManager.path_requires_pathmanager(src_path) or PathManager.path_requires_pathmanager(dst_path):
            return fairseq_copy(src_path, dst_path, overwrite=overwrite)
        if os.path.exists(dst_path) and not overwrite:
            return False
        atomic_copy(src_path, dst_path)
        return True

    copy._deepnet_safe = True
    PathManager.copy = staticmethod(copy)


def install_checkpoint_load_errors() -> None:
    """Make ``checkpoint_utils.load_checkpoint_to_cpu`` name the file it cannot read and attach the
    checkpoint's residual-scheme record (idempotent).

    Resume, ``fairseq-generate`` and hub loading then raise :class:`CheckpointLoadError` naming the
    file when it is truncated, corrupt or refused, and ``state["model"]`` carries the residual-scheme
    record of the checkpoint for ``load_state_dict`` to check (:mod:`deepnet_fairseq.scheme_record`).
    """
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    if getattr(checkpoint_utils.load_checkpoint_to_cpu, "_deepnet_load_errors", False):
        return
    fairseq_load = checkpoint_utils.load_checkpoint_to_cpu

    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        state = read(path, arg_overrides, load_on_all_ranks)
        # what the checkpoint was trained as: its configuration as stored, before --model-overrides
        # (only overrides make the loaded one differ: then the file's own is read, its weights mapped)
        stored = load_checkpoint(PathManager.get_local_path(path), mmap=True) if arg_overrides else state
        try:
            attach_record(state, record_from_model_config(stored_model_config(stored)), arg_overrides)
        except DeepNetConfigError as err:
            raise CheckpointLoadError(f"checkpoint {path}: its stored model configuration is refused: {err}") from err
        return state

    def read(path, arg_overrides, load_on_all_ranks):
        try:
            return fairseq_load(path, arg_overrides, load_on_all_ranks)
        except FileNotFoundError:
            raise
        except pickle.UnpicklingError as err:
            raise CheckpointLoadError(f"checkpoint {path} was refused by torch's safe loader: {err}") from err
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            if isinstance(err, CheckpointLoadError):
                raise
            raise CheckpointLoadError(
                f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it is truncated or corrupt. "
                "Use an earlier checkpoint (e.g. checkpointN.pt) or remove it to start afresh."
            ) from err

    load_checkpoint_to_cpu._deepnet_load_errors = True
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu


def install_record_broadcast() -> None:
    """Make ``distributed_utils.broadcast_object`` put the residual-scheme record back on a broadcast
    checkpoint state's weights (idempotent).

    Rank 0 broadcasts a loaded checkpoint to every rank (itself included) as rebuilt plain dicts; the
    record also travels as a top-level entry of the state, from which it is re-attached.
    """
    from fairseq.distributed import utils as distributed_utils

    if getattr(distributed_utils.broadcast_object, "_deepnet_record", False):
        return
    fairseq_broadcast = distributed_utils.broadcast_object

    @functools.wraps(fairseq_broadcast)
    def broadcast_object(obj, *args, **kwargs):
        result = fairseq_broadcast(obj, *args, **kwargs)
        if isinstance(result, dict) and isinstance(result.get(RECORD_STATE_KEY), dict):
            attach_record(result, result[RECORD_STATE_KEY], {})
        return result

    broadcast_object._deepnet_record = True
    distributed_utils.broadcast_object = broadcast_object
