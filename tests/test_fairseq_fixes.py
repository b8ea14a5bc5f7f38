"""Issue 16: every change the plugin makes to fairseq is one guarded unit (deepnet_fairseq.fairseq_fixes),
and the pure tools import neither torch nor fairseq."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from collections import Counter

import fairseq
import numpy
import pytest
from fairseq.data import data_utils

import deepnet_fairseq
from conftest import REPO
from deepnet_fairseq import fairseq_fixes
from deepnet_fairseq.fairseq_fixes import CHECKED_FAIRSEQ_VERSION, ENV_VAR, FIXES, install_fixes
from modelkit import build

NAMES = [fix.name for fix in FIXES]

# a fresh process: the pure tools, then the package's lazy attributes, then register() once fairseq is imported
LIGHT_THEN_REGISTER = r"""
import argparse, json, logging, os, sys, tempfile
logging.basicConfig(level=logging.INFO)
import deepnet_fairseq.coefficients
import deepnet_fairseq.cli.coefficients
from deepnet_fairseq import DeepNormCoefficients, deepnorm_coefficients
import deepnet_fairseq

result = {"light": sorted(m for m in ("torch", "fairseq") if m in sys.modules)}
deepnet_fairseq.cli.coefficients.main(["--layers", "6"])
result["after_coefficients_cli"] = sorted(m for m in ("torch", "fairseq") if m in sys.modules)

import fairseq
deepnet_fairseq.register()

import torch
from fairseq.models import ARCH_MODEL_REGISTRY
from deepnet_fairseq import checkpoints
result["registered"] = "deepnet_transformer" in ARCH_MODEL_REGISTRY
result["lazy"] = (deepnet_fairseq.install_checkpoint_allowlist is checkpoints.install_checkpoint_allowlist
                  and deepnet_fairseq.models is sys.modules["deepnet_fairseq.models"])
path = os.path.join(tempfile.mkdtemp(), "state.pt")
torch.save({"args": argparse.Namespace(arch="deepnet_transformer"), "model": {}}, path)
result["loaded"] = checkpoints.load_checkpoint(path)["args"].arch
print("@@ " + json.dumps(result))
"""

# a fresh process whose fairseq lacks the private _TensorPlaceholder when the plugin is imported: the
# allow-list still installs and loads, and says what it lacks
WITHOUT_PLACEHOLDER = r"""
import argparse, logging, os, tempfile
logging.basicConfig(level=logging.INFO)
import fairseq.distributed.utils
del fairseq.distributed.utils._TensorPlaceholder
import deepnet_fairseq
import torch
path = os.path.join(tempfile.mkdtemp(), "state.pt")
torch.save({"args": argparse.Namespace(arch="deepnet_transformer"), "model": {}}, path)
print("@@ " + deepnet_fairseq.checkpoints.load_checkpoint(path)["args"].arch)
"""


def _run(script: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_pure_tools_import_without_torch_or_fairseq_and_register_works_later():
    proc = _run(LIGHT_THEN_REGISTER)
    result = json.loads(proc.stdout.split("@@ ")[-1])
    assert result["light"] == [] and result["after_coefficients_cli"] == []
    assert "| 6 |" in proc.stdout
    assert result["registered"] and result["lazy"]
    assert result["loaded"] == "deepnet_transformer"
    active = [line for line in proc.stderr.splitlines() if "fairseq fixes active" in line]
    assert len(active) == 1 and all(name in active[0] for name in NAMES)


def test_allow_list_without_fairseqs_private_placeholder():
    proc = _run(WITHOUT_PLACEHOLDER)
    assert proc.stdout.split("@@ ")[-1].strip() == "deepnet_transformer"
    assert "_TensorPlaceholder is missing" in proc.stderr


@pytest.fixture
def counted(monkeypatch):
    """The real fixes with counting install functions, installed afresh; returns the Counter of installs."""
    installs = Counter()

    def counting(name):
        return lambda: installs.update([name])

    monkeypatch.setattr(fairseq_fixes, "FIXES", tuple(dataclasses.replace(fix, install=counting(fix.name))
                                                      for fix in FIXES))
    monkeypatch.setattr(fairseq_fixes, "_active", None)
    monkeypatch.delenv(ENV_VAR, raising=False)
    return installs


def _messages(caplog, level):
    return [r.getMessage() for r in caplog.records if r.name == fairseq_fixes.__name__ and r.levelno == level]


def test_each_fix_installs_once_and_one_info_line_names_them(counted, caplog):
    caplog.set_level(logging.INFO, logger=fairseq_fixes.__name__)
    assert install_fixes() == tuple(NAMES)
    assert install_fixes() == tuple(NAMES)
    assert counted == Counter(NAMES)
    (info,) = _messages(caplog, logging.INFO)
    assert info == f"fairseq fixes active (fairseq {CHECKED_FAIRSEQ_VERSION}): {', '.join(NAMES)}"
    assert not _messages(caplog, logging.WARNING)


def test_real_fixes_are_installed_and_reinstalling_changes_nothing():
    from fairseq import checkpoint_utils, trainer
    from fairseq.distributed import utils as distributed_utils
    from fairseq.file_io import PathManager
    from fairseq.models.fairseq_model import BaseFairseqModel

    from deepnet_fairseq.compat import FAIRSEQ_NUMPY

    deepnet_fairseq.register()
    assert fairseq.__version__ == CHECKED_FAIRSEQ_VERSION
    assert all(fix.applies() for fix in FIXES)  # the checks hold on the version they were written for

    def targets():
        return (PathManager.copy, checkpoint_utils.load_checkpoint_to_cpu, distributed_utils.broadcast_object,
                trainer.Trainer.train_step, trainer.NanDetector, data_utils.batch_by_size, data_utils.np,
                BaseFairseqModel.load_state_dict)

    before = targets()
    for fix in FIXES:
        fix.install()
    assert targets() == before
    assert PathManager.copy._deepnet_safe and checkpoint_utils.load_checkpoint_to_cpu._deepnet_load_errors
    assert distributed_utils.broadcast_object._deepnet_record and trainer.Trainer.train_step._deepnet_guard
    assert trainer.NanDetector._deepnet_leaf_backward and data_utils.batch_by_size._deepnet_keeps_last
    assert data_utils.np is FAIRSEQ_NUMPY and BaseFairseqModel.load_state_dict._deepnet_record_check


def test_environment_switches_fixes_off(counted, caplog, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "-keep_last_batch, -scheme_record_check")
    caplog.set_level(logging.INFO, logger=fairseq_fixes.__name__)
    assert install_fixes() == tuple(n for n in NAMES if n not in ("keep_last_batch", "scheme_record_check"))
    assert set(counted) == set(NAMES) - {"keep_last_batch", "scheme_record_check"}
    warnings = _messages(caplog, logging.WARNING)
    assert len(warnings) == 2 and all(ENV_VAR in w for w in warnings)
    assert "scheme_record_check" in warnings[1] and "loads silently" in warnings[1]


def test_environment_off_installs_none(counted, caplog, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "off")
    caplog.set_level(logging.INFO, logger=fairseq_fixes.__name__)
    assert install_fixes() == ()
    assert not counted
    assert len(_messages(caplog, logging.WARNING)) == len(NAMES)
    assert _messages(caplog, logging.INFO) == [f"fairseq fixes active (fairseq {CHECKED_FAIRSEQ_VERSION}): none"]


@pytest.mark.parametrize("setting", ["-no_such_fix", "keep_last_batch", "-keep_last_batch,on"])
def test_environment_unknown_name_is_an_error(counted, monkeypatch, setting):
    monkeypatch.setenv(ENV_VAR, setting)
    with pytest.raises(ValueError, match=rf"{ENV_VAR}=.*names from: checkpoint_allowlist, .*scheme_record_check"):
        install_fixes()
    assert not counted


def test_unknown_fairseq_version_skips_fixes_whose_target_changed(counted, caplog, monkeypatch):
    def batch_by_size(indices, num_tokens_fn, *args):  # a fairseq whose batch_by_size lost fixed_shapes
        return [indices]

    monkeypatch.setattr(fairseq, "__version__", "0.13.0")
    monkeypatch.setattr(data_utils, "batch_by_size", batch_by_size)
    caplog.set_level(logging.INFO, logger=fairseq_fixes.__name__)
    assert install_fixes() == tuple(n for n in NAMES if n != "keep_last_batch")
    assert set(counted) == set(NAMES) - {"keep_last_batch"}
    (warning,) = _messages(caplog, logging.WARNING)
    assert "0.13.0" in warning and CHECKED_FAIRSEQ_VERSION in warning
    assert warning.endswith("skipped: keep_last_batch (fairseq.data.data_utils.batch_by_size)")


def test_keep_last_batch_binds_arguments_by_name():
    deepnet_fairseq.register()
    indices, shapes = numpy.arange(10), numpy.array([[3, 1]])

    def one(index):
        return 1

    for batches in (data_utils.batch_by_size(indices, one, None, None, 4, 4),
                    data_utils.batch_by_size(indices, one, max_sentences=4, required_batch_size_multiple=4)):
        assert [list(b) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for batches in (data_utils.batch_by_size(indices, one, None, None, 4, 4, shapes),
                    data_utils.batch_by_size(indices, one, max_sentences=4, fixed_shapes=shapes)):
        assert [list(b) for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_nan_detector_leaf_hooks_only_for_deepnet_models(tiny_data):
    from fairseq import trainer
    from fairseq.nan_detector import NanDetector

    deepnet_fairseq.register()
    small = ("--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim",
             "32", "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32")
    stock, _ = build(tiny_data, *small, arch="transformer")
    deepnet, _ = build(tiny_data, arch="deepnet_transformer_tiny")
    modules = {"stock": len(list(stock.named_modules())), "deepnet": len(list(deepnet.named_modules()))}
    leaves = len([m for m in deepnet.modules() if next(m.children(), None) is None])
    for model, backward_hooks in ((stock, modules["stock"]), (deepnet, leaves)):
        detector, fairseq_detector = trainer.NanDetector(model), NanDetector(model)
        assert len(detector.fhooks) == len(fairseq_detector.fhooks) == len(fairseq_detector.bhooks)
        assert len(detector.bhooks) == backward_hooks
        detector.close()
        fairseq_detector.close()
        assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert leaves < modules["deepnet"]
