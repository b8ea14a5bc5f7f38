"""deepnet-fairseq: DeepNet / DeepNorm (Wang et al. 2022, arXiv:2203.00555) as a fairseq plugin.

Loaded by ``fairseq-train --user-dir deepnet_fairseq`` (or :func:`register` in Python):
:func:`register` installs this plugin's fixes to fairseq (:mod:`deepnet_fairseq.fairseq_fixes`: the
checkpoint allow-list for ``torch.load(weights_only=True)``, crash-safe checkpoint copies, clear
divergence reports, the last batch fairseq main drops, NumPy 2 names, the residual-scheme check on
loading) and registers the models and architectures (:mod:`deepnet_fairseq.models`).

Importing the package imports neither torch nor fairseq, so the pure tools
(:mod:`deepnet_fairseq.coefficients`, ``deepnet-coefficients``) start at once.  It registers at
import when fairseq is already imported (fairseq's CLIs, ``--user-dir``, code that imports fairseq
first); code that imports ``deepnet_fairseq`` before fairseq calls :func:`register` (fairseq's
``--user-dir`` does nothing for a package that is already imported).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from deepnet_fairseq.coefficients import DeepNormCoefficients, deepnorm_coefficients

__all__ = ["DeepNormCoefficients", "deepnorm_coefficients", "install_checkpoint_allowlist", "models", "register"]
__version__ = "0.1.0"

# former attributes, now imported on first use (PEP 562): name -> module that defines it
_LAZY = {
    "install_checkpoint_allowlist": "deepnet_fairseq.checkpoints",
}


def register() -> None:
    """Install the fairseq fixes and register this plugin's models with fairseq (idempotent)."""
    importlib.import_module("deepnet_fairseq.models")  # installs the fixes first (models/__init__.py)


def __getattr__(name: str) -> Any:
    if name == "models":
        return importlib.import_module("deepnet_fairseq.models")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "fairseq" in sys.modules:
    register()
