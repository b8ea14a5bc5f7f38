"""Issue 13: the safe loader's allow-list holds only data constructors, and no payload runs through any loader.

Two directions.  ``test_allow_list_is_exactly_the_reviewed_data_constructors`` fails naming any entry that
was added without review (or aliases a reviewed name to another object), and the tests next to it check
the reasons the reviewed entries are safe.  ``test_payload_is_refused`` feeds checkpoints carrying code
through every way this project loads one, and checks that each is refused and that the payload's marker
file never appears; ``test_payload_runs_when_unpickled_without_the_allow_list`` proves that every payload
is live (it does write the marker under ``torch.load(weights_only=False)``), so a refusal is not the
payload's own fault.
"""

from __future__ import annotations

import argparse
import collections
import copyreg
import functools
import logging
import os
import pickle
import re
import subprocess
import sys
import types
import typing
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
import torch
from fairseq.distributed.utils import _TensorPlaceholder
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.basecontainer import BaseContainer
from omegaconf.nodes import AnyNode

import deepnet_fairseq  # noqa: F401  (installs the allow-list)
from conftest import USER_DIR, train_args
from deepnet_fairseq.checkpoints import CHECKPOINT_GLOBALS, CheckpointLoadError, checkpoint_globals, load_checkpoint
from deepnet_fairseq.cli import average_checkpoints as average_cli

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar

NUMPY_CORE = _reconstruct.__module__  # numpy._core.multiarray (numpy 2) or numpy.core.multiarray (1.x)

# The reviewed allow-list: the name a checkpoint's GLOBAL opcode uses -> the object torch then hands out.
REVIEWED_GLOBALS: Dict[str, object] = {
    "argparse.Namespace": argparse.Namespace,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    f"{NUMPY_CORE}._reconstruct": _reconstruct,
    f"{NUMPY_CORE}.scalar": scalar,
    "numpy.core.multiarray._reconstruct": _reconstruct,
    "numpy.core.multiarray.scalar": scalar,
    **{
        f"numpy.dtypes.{name}": getattr(np.dtypes, name)
        for name in ("BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt8DType",
                     "UInt16DType", "UInt32DType", "UInt64DType", "Float16DType", "Float32DType", "Float64DType")
    },
    "omegaconf.dictconfig.DictConfig": DictConfig,
    "omegaconf.listconfig.ListConfig": ListConfig,
    "omegaconf.base.ContainerMetadata": ContainerMetadata,
    "omegaconf.base.Metadata": Metadata,
    "omegaconf.nodes.AnyNode": AnyNode,
    "typing.Any": typing.Any,
    "builtins.dict": dict,
    "builtins.list": list,
    "builtins.int": int,
    "collections.defaultdict": collections.defaultdict,
    "fairseq.distributed.utils._TensorPlaceholder": _TensorPlaceholder,
}

# OmegaConf's own resolvers and the ones hydra registers: each reads data (an environment variable, a
# node, the clock, the Python version) and none evaluates code.
DATA_RESOLVERS = {"oc.create", "oc.decode", "oc.deprecated", "oc.env", "oc.select", "oc.dict.keys",
                  "oc.dict.values", "now", "hydra", "python_version"}


def _registered_name(entry) -> str:
    """The GLOBAL name torch accepts for an allow-list entry: the alias of a ``(obj, name)`` pair, else
    ``module.qualname``."""
    return entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"


def _as_mapping(entries) -> Dict[str, object]:
    return {_registered_name(e): e[0] if isinstance(e, tuple) else e for e in entries}


def _difference(actual: Dict[str, object], reviewed: Dict[str, object]) -> List[str]:
    problems = [f"not reviewed: {name} -> {obj!r}" for name, obj in actual.items() if name not in reviewed]
    problems += [f"{name} now names {actual[name]!r}, reviewed as {reviewed[name]!r}"
                 for name in actual.keys() & reviewed.keys() if actual[name] is not reviewed[name]]
    problems += [f"reviewed but gone: {name}" for name in reviewed.keys() - actual.keys()]
    return sorted(problems)


def test_allow_list_is_exactly_the_reviewed_data_constructors():
    """Each name the safe unpickler accepts must be reviewed against this rule, and a new one fails here.

    Rule: ``torch.load(weights_only=True)`` calls an allow-listed global in three ways: REDUCE
    (``f(*args)``), NEWOBJ (``cls.__new__(cls, *args)``) and BUILD (``obj.__setstate__(state)``, or
    ``obj.__dict__.update(state)``), with arguments that are themselves literals, allow-listed globals or
    objects built by them.  An entry is allowed only if all three only build or store data whatever the
    arguments, and never call, import, open or evaluate anything reached through its arguments:

    * classes whose ``__init__``/``__new__`` and ``__setstate__``/BUILD store their arguments as data:
      ``argparse.Namespace``; OmegaConf ``DictConfig``/``ListConfig`` (whose ``__setstate__`` stores the
      pickled dict) and their ``AnyNode``/``Metadata``/``ContainerMetadata`` (dataclasses of data);
      ``numpy.ndarray``, ``numpy.dtype`` and the twelve numeric ``numpy.dtypes.*DType`` classes (numpy
      refuses to build an object array from raw bytes, see
      ``test_numpy_allowed_globals_refuse_object_arrays_from_raw_bytes``); ``typing.Any`` (cannot be
      instantiated); ``dict``, ``list``, ``int``; fairseq's ``_TensorPlaceholder`` (a dataclass holding
      an int);
    * ``collections.defaultdict``, which is safe only because of the other entries: it calls its
      ``default_factory`` with no arguments on a missing key, long after loading, and that factory can
      only be an object on the unpickler's stack, i.e. an allow-listed global (or a non-callable data
      object), never ``os.system`` (``test_defaultdict_factory_can_only_build_data``).  Allow-listing any
      callable that does something when called with no arguments would make defaultdict a trigger;
    * numpy's ``_reconstruct`` (an empty array of an ``ndarray`` subtype, which must itself be on the
      stack) and ``scalar`` (a numeric scalar from bytes; object dtype refused): they only build arrays.

    OmegaConf interpolations (``${...}``) in a loaded config are resolved only by the resolvers this
    process registered (``test_omegaconf_resolvers_only_read_data``), never by the checkpoint.
    """
    problems = _difference(_as_mapping(CHECKPOINT_GLOBALS), REVIEWED_GLOBALS)
    assert not problems, "CHECKPOINT_GLOBALS changed; review each against this test's rule:\n" + "\n".join(problems)
    # what torch honours after `import deepnet_fairseq`: the list, plus only what torch registers for its
    # own classes (nested tensors, device meshes) when those modules are imported
    registered = {name: obj for name, obj in _as_mapping(torch.serialization.get_safe_globals()).items()
                  if not name.startswith("torch.")}
    problems = _difference(registered, REVIEWED_GLOBALS)
    assert not problems, "torch's safe globals differ from the reviewed list:\n" + "\n".join(problems)


def test_defaultdict_factory_can_only_build_data():
    """A defaultdict's factory is on the unpickler's stack, so it is an allow-listed global; called with no
    arguments (a missing key) each one builds an empty data object or raises TypeError."""
    for name, factory in REVIEWED_GLOBALS.items():
        try:
            value = collections.defaultdict(factory)["missing"]
        except TypeError:
            continue
        data_types = (argparse.Namespace, np.dtype, AnyNode, dict, list, int)
        assert isinstance(value, data_types), (name, value)


def test_omegaconf_resolvers_only_read_data():
    """Interpolations in a loaded cfg can only reach resolvers registered in this process; none runs code."""
    assert set(BaseContainer._resolvers) <= DATA_RESOLVERS, set(BaseContainer._resolvers) - DATA_RESOLVERS


class _Call:
    """Pickles as ``func(*args)``: unpickling it calls ``func`` (the classic reducer exploit)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __call__(self, *args):  # pickle only accepts a callable in a reducer's function slot
        raise AssertionError("payloads are only pickled, never called here")

    def __reduce__(self):
        return self.func, self.args


class _Reduce:
    """Pickles as ``func(*args)`` followed by BUILD with ``state``."""

    def __init__(self, func, args, state):
        self.reduction = func, args, state

    def __reduce__(self):
        return self.reduction


class _EvilArray(np.ndarray):
    """An ndarray subtype whose construction (``_reconstruct`` calls ``__array_finalize__``) writes ``marker``."""

    marker: Optional[Path] = None

    def __array_finalize__(self, obj):
        if _EvilArray.marker is not None:
            _EvilArray.marker.touch()


def _code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


class _Py3NamesPickler(pickle.Pickler):
    """Writes globals under their Python 3 names (``subprocess.check_output``), the names torch resolves;
    protocol 2's default ``fix_imports`` would rename some to Python 2 modules torch never matches."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, fix_imports=False, **kwargs)


PY3_NAMES_PICKLE = types.SimpleNamespace(
    __name__="pickle", Pickler=_Py3NamesPickler, dump=functools.partial(pickle.dump, fix_imports=False)
)


def _saved(path: Path, state, legacy: bool = False) -> Path:
    """``torch.save`` (protocol 2, as torch writes), zip or legacy format."""
    torch.save(state, path, pickle_module=PY3_NAMES_PICKLE, _use_new_zipfile_serialization=not legacy)
    return path


def _checkpoint(path: Path, payload) -> Path:
    """A fairseq-shaped zip checkpoint (a tensor record included) whose ``args`` is ``payload``."""
    return _saved(path, {"model": {"w": torch.zeros(2)}, "args": payload, "cfg": None})


def _zip_with_data_pkl(path: Path, raw: bytes) -> Path:
    """A torch zip checkpoint whose ``data.pkl`` is ``raw`` (hand-made pickle opcodes)."""
    _saved(path, {"model": {}})
    with zipfile.ZipFile(path) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries:
            archive.writestr(name, raw if name.endswith("/data.pkl") else data)
    return path


def _nested_torch_load(marker: Path, tmp: Path) -> Path:
    inner = _checkpoint(tmp / "inner.pt", _Call(eval, _code(marker)))
    # an explicit pickle_module turns weights_only off in torch.load
    return _checkpoint(tmp / "evil.pt", _Call(torch.load, str(inner), None, _Call(__import__, "pickle")))


def _numpy_load(marker: Path, tmp: Path) -> Path:
    inner = tmp / "inner.npy"
    np.save(inner, np.array([_Call(eval, _code(marker))], dtype=object), allow_pickle=True)
    return _checkpoint(tmp / "evil.pt", _Call(np.load, str(inner), None, True))  # allow_pickle=True


def _evil_subtype(marker: Path, tmp: Path) -> Path:
    _EvilArray.marker = marker
    return _checkpoint(tmp / "evil.pt", _Call(_reconstruct, _EvilArray, (0,), "b"))


def _inst_opcode(marker: Path, tmp: Path) -> Path:
    code = _code(marker).encode()
    # MARK, BINUNICODE code, INST builtins.eval (protocol 0's call opcode), STOP
    raw = b"(X" + len(code).to_bytes(4, "little") + code + b"ibuiltins\neval\n."
    return _zip_with_data_pkl(tmp / "evil.pt", raw)


def _legacy_format(marker: Path, tmp: Path) -> Path:
    return _saved(tmp / "evil.pt", {"model": {}, "args": _Call(eval, _code(marker))}, legacy=True)


def _wait(loaded) -> None:
    loaded["args"].wait()  # the Popen object


def _close(loaded) -> None:
    loaded["args"].close()  # the FileHandler object


def _missing_key(loaded) -> None:
    loaded["model"]  # fairseq reads state["model"]: a missing key calls the default_factory


@dataclass
class Payload:
    """Writes a checkpoint that runs code writing ``marker`` when unpickled; ``trigger`` is what a
    program does with the loaded object that fires it (nothing when unpickling alone fires it)."""

    build: Callable[[Path, Path], Path]
    trigger: Callable[[object], None] = lambda loaded: None


# Python 3 has no ``builtins.apply`` (pickle's Python 2 spelling of REDUCE), so no pickle can name it; torch
# also refuses every global of the os/posix/nt/sys modules even when allow-listed, so ``os.system`` is
# refused twice, and the payloads through subprocess, eval, exec, __import__ and the rest are what
# show an allow-list mistake.
PAYLOADS: Dict[str, Payload] = {
    "eval": Payload(lambda m, t: _checkpoint(t / "evil.pt", _Call(eval, _code(m)))),
    "exec": Payload(lambda m, t: _checkpoint(t / "evil.pt", _Call(exec, _code(m)))),
    "os.system": Payload(lambda m, t: _checkpoint(t / "evil.pt", _Call(os.system, f"touch '{m}'"))),
    "subprocess.Popen": Payload(lambda m, t: _checkpoint(t / "evil.pt", _Call(subprocess.Popen, ["touch", str(m)])),
                                _wait),
    "subprocess.check_output": Payload(
        lambda m, t: _checkpoint(t / "evil.pt", _Call(subprocess.check_output, ["touch", str(m)]))),
    "getattr-__import__-os-system": Payload(lambda m, t: _checkpoint(
        t / "evil.pt", _Call(_Call(getattr, _Call(__import__, "os"), "system"), f"touch '{m}'"))),
    "__import__-pathlib-Path-touch": Payload(lambda m, t: _checkpoint(t / "evil.pt", _Call(_Call(
        getattr, _Call(_Call(getattr, _Call(__import__, "pathlib"), "Path"), str(m)), "touch")))),
    "copyreg._reconstructor": Payload(lambda m, t: _checkpoint(
        t / "evil.pt", _Call(copyreg._reconstructor, logging.FileHandler, logging.FileHandler, str(m))), _close),
    "functools.partial": Payload(lambda m, t: _checkpoint(
        t / "evil.pt", _Call(functools.partial(os.system, f"touch '{m}'")))),
    "torch.load-nested-file": Payload(_nested_torch_load),
    "numpy.load-allow_pickle": Payload(_numpy_load),
    "defaultdict-default_factory": Payload(lambda m, t: _saved(
        t / "evil.pt", collections.defaultdict(functools.partial(eval, _code(m)), {"args": None})), _missing_key),
    "omegaconf-node-value": Payload(lambda m, t: _saved(t / "evil.pt", {"model": {}, "cfg": OmegaConf.create(
        {"model": {"arch": _Call(eval, _code(m))}}, flags={"allow_objects": True})})),
    "_reconstruct-evaluated-dtype": Payload(lambda m, t: _checkpoint(
        t / "evil.pt", _Call(_reconstruct, np.ndarray, (0,), _Call(eval, _code(m) + " or 'b'")))),
    "_reconstruct-ndarray-subtype": Payload(_evil_subtype),
    "protocol4-STACK_GLOBAL": Payload(lambda m, t: _zip_with_data_pkl(
        t / "evil.pt", pickle.dumps(_Call(eval, _code(m)), protocol=4))),
    "INST-opcode": Payload(_inst_opcode),
    "legacy-non-zip-format": Payload(_legacy_format),
}


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "payload_ran"
    yield path
    _EvilArray.marker = None


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_payload_runs_when_unpickled_without_the_allow_list(name, marker, tmp_path):
    """The payloads are real: ``torch.load(weights_only=False)`` (plus the use that fires it) writes the marker."""
    payload = PAYLOADS[name]
    path = payload.build(marker, tmp_path)
    assert not marker.exists()
    payload.trigger(torch.load(path, weights_only=False))
    assert marker.exists()


def _run_cli(module, argv: List[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [module.__name__, *map(str, argv)])
    module.cli_main()


def _refused_by_fairseq(run: Callable[[], object], path: Path) -> None:
    with pytest.raises(CheckpointLoadError, match="refused by torch's safe loader") as err:
        run()
    assert str(path) in str(err.value)


def _load_checkpoint(path: Path, request) -> None:
    with pytest.raises(RuntimeError, match=re.escape(f"cannot load checkpoint {path}")) as err:
        load_checkpoint(path)
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)


def _average(path: Path, request) -> None:
    capsys = request.getfixturevalue("capsys")
    out = path.parent / "avg.pt"
    assert average_cli.main(["--inputs", str(path), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"cannot load checkpoint {path}: Weights only load failed" in err, err
    assert not out.exists()


def _hub(path: Path, request) -> None:
    from fairseq.models.transformer import TransformerModel

    data = request.getfixturevalue("tiny_data")
    _refused_by_fairseq(lambda: TransformerModel.from_pretrained(
        str(path.parent), checkpoint_file=path.name, data_name_or_path=str(data),
        source_lang="src", target_lang="tgt"), path)


def _generate(path: Path, request) -> None:
    from fairseq_cli import generate

    data, monkeypatch = request.getfixturevalue("tiny_data"), request.getfixturevalue("monkeypatch")
    argv = [data, "--user-dir", USER_DIR, "--path", path, "--cpu", "--beam", "1"]
    _refused_by_fairseq(lambda: _run_cli(generate, argv, monkeypatch), path)


def _interactive(path: Path, request) -> None:
    from fairseq_cli import interactive

    data, monkeypatch = request.getfixturevalue("tiny_data"), request.getfixturevalue("monkeypatch")
    argv = [data, "--user-dir", USER_DIR, "--path", path, "--cpu", "--beam", "1",
            "--source-lang", "src", "--target-lang", "tgt", "--input", "-"]
    _refused_by_fairseq(lambda: _run_cli(interactive, argv, monkeypatch), path)


def _train_resume(path: Path, request) -> None:
    from fairseq_cli import train

    data, monkeypatch = request.getfixturevalue("tiny_data"), request.getfixturevalue("monkeypatch")
    save = path.parent / "save"
    save.mkdir()
    last = save / "checkpoint_last.pt"
    path.rename(last)
    argv = train_args(data, save, "--max-update", "1", "--disable-validation")[1:]
    _refused_by_fairseq(lambda: _run_cli(train, argv, monkeypatch), last)


LOADERS: Dict[str, Callable[[Path, object], None]] = {
    "load_checkpoint": _load_checkpoint,
    "deepnet-average-checkpoints": _average,
    "hub-from_pretrained": _hub,
    "fairseq-generate": _generate,
    "fairseq-interactive": _interactive,
    "fairseq-train-resume": _train_resume,
}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("name", list(PAYLOADS))
def test_payload_is_refused(name, loader, marker, tmp_path, request):
    """Every loading path refuses the payload with its own clear error, and the payload never runs."""
    path = PAYLOADS[name].build(marker, tmp_path)
    not_refused = None
    try:
        LOADERS[loader](path, request)
    except (AssertionError, pytest.fail.Exception) as err:
        not_refused = err
    assert not marker.exists(), f"the payload ran ({not_refused or 'then the loader refused the file'})"
    if not_refused is not None:
        raise not_refused


@pytest.mark.parametrize("spec", ["O", [("a", "O"), ("b", "i8")]], ids=["object", "structured-with-object"])
def test_numpy_allowed_globals_refuse_object_arrays_from_raw_bytes(spec, tmp_path):
    """A payload made only of allow-listed numpy globals cannot forge object pointers from raw bytes:
    numpy's ``ndarray.__setstate__`` and ``scalar`` refuse raw bytes for a dtype holding objects."""
    dtype = _Call(np.dtype, spec)  # built by REDUCE (a pickled dtype object would need ObjectDType/VoidDType)
    forged = b"\x41" * 2 * np.dtype(spec).itemsize  # would be read as PyObject* addresses
    array = _Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (2,), dtype, False, forged))
    for name, payload in (("array", array), ("scalar", _Call(scalar, dtype, forged[: np.dtype(spec).itemsize]))):
        path = _checkpoint(tmp_path / f"{name}.pt", payload)
        assert checkpoint_globals(path) <= set(REVIEWED_GLOBALS)
        with pytest.raises(RuntimeError, match=re.escape(f"cannot load checkpoint {path}")) as err:
            load_checkpoint(path)
        assert isinstance(err.value.__cause__, (TypeError, RuntimeError)), err.value.__cause__
        assert "object" in str(err.value.__cause__).lower() or "NPY_LIST_PICKLE" in str(err.value.__cause__)
