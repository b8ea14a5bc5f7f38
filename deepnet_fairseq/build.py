"""Build a model from a ``fairseq-train`` command line, the way ``fairseq-train`` builds it.

One helper for everything that needs a model outside a training run (tests, benchmarks, the toy-scale
analyses): fairseq's own training parser with ``--user-dir`` pointing at this package, then
``options.parse_args_and_arch``, ``utils.import_user_module``, ``tasks.setup_task`` and
``task.build_model``. Nothing is trained, no criterion or optimizer is built. Stock fairseq
architectures (``--arch transformer``) build the same way: the plugin is loaded, its options are not
added to a stock architecture's command line.

Not imported by ``deepnet_fairseq/__init__.py`` (it imports fairseq): ``from deepnet_fairseq.build
import build_from_command_line``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
from fairseq import options, tasks, utils
from fairseq.tasks import FairseqTask

import deepnet_fairseq

PLUGIN_DIR = str(Path(__file__).resolve().parent)
"""The ``--user-dir`` every command line parsed here gets: this package's directory."""

_ADDED_FLAGS = ("--user-dir", "--task")


class BuiltModel(NamedTuple):
    """What :func:`build_from_command_line` returns."""

    model: torch.nn.Module
    """The model as ``task.build_model`` returns it (training mode, on the CPU or the current default device)."""
    task: FairseqTask
    """The task from ``tasks.setup_task`` (dictionaries loaded, no dataset loaded)."""
    args: argparse.Namespace
    """The parsed command line; ``build_model`` fills in the architecture's defaults (``encoder_embed_dim``...)."""


def parse_command_line(argv: Sequence[object], *, task: str = "translation") -> argparse.Namespace:
    """Parse ``fairseq-train <argv>`` with ``--user-dir`` this package and ``--task task``.

    ``argv`` is a ``fairseq-train`` command line without the program name, e.g.
    ``[data_dir, "--arch", "deepnet_transformer", "--deepnorm", "--cpu"]``; items are passed through
    ``str`` (paths, numbers). Runs ``options.get_training_parser(default_task=task)``,
    ``options.parse_args_and_arch`` and ``utils.import_user_module``, as ``fairseq-train`` does.

    Raises ``ValueError`` when ``argv`` already names ``--user-dir`` or ``--task`` (both are set here;
    pass ``task=`` instead), and ``SystemExit`` from argparse, as ``fairseq-train`` exits, on an unknown
    flag or architecture or a missing data directory argument.
    """
    words = [str(word) for word in argv]
    for flag in _ADDED_FLAGS:
        if any(word == flag or word.startswith(flag + "=") for word in words):
            raise ValueError(f"{flag} is set by parse_command_line (user dir {PLUGIN_DIR}, task= argument); "
                             f"remove it from the command line {words}")
    # --user-dir is a no-op when deepnet_fairseq was imported before fairseq: register explicitly
    deepnet_fairseq.register()
    parser = options.get_training_parser(default_task=task)
    args = options.parse_args_and_arch(parser, ["--user-dir", PLUGIN_DIR, "--task", task, *words])
    utils.import_user_module(args)
    return args


def build_from_args(args: argparse.Namespace, *, seed: Optional[int] = 0) -> BuiltModel:
    """``tasks.setup_task(args)`` then ``task.build_model(args)`` on an already parsed command line.

    For callers that change the parsed ``args`` before building (otherwise use
    :func:`build_from_command_line`). With ``seed`` not ``None``, ``torch.manual_seed(seed)`` runs right
    before ``build_model``, so the same command line and seed give the same initial weights; ``None``
    leaves torch's random state as it is.
    """
    task = tasks.setup_task(args)
    if seed is not None:
        torch.manual_seed(seed)
    model = task.build_model(args)
    return BuiltModel(model, task, args)


def build_from_command_line(argv: Sequence[object], *, task: str = "translation",
                            seed: Optional[int] = 0) -> BuiltModel:
    """Build ``(model, task, args)`` from a ``fairseq-train`` command line, without training.

    ``argv``: the command line without the program name (data directory, ``--arch``, flags; see
    :func:`parse_command_line`); ``task``: the fairseq task (``translation``, ``language_modeling``,
    ``masked_lm``...); ``seed``: see :func:`build_from_args`. The data directory needs the task's
    dictionaries only (``dict.<lang>.txt`` or ``dict.txt``), no binarized data.

    Raises what :func:`parse_command_line` raises, and whatever the architecture's ``build_model``
    raises for a refused configuration (e.g. :class:`deepnet_fairseq.schemes.DeepNetConfigError`).
    """
    return build_from_args(parse_command_line(argv, task=task), seed=seed)
