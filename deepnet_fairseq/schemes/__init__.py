"""Residual schemes: how a sub-layer combines its input x with its branch G(x), and how it starts.

Every module of this package except :mod:`~deepnet_fairseq.schemes.base` and
:mod:`~deepnet_fairseq.schemes.init` defines schemes with ``@register_scheme``; importing the package
imports them all (in module-name order, fairseq's own way of loading its models), so a new scheme is
one new module.  ``--residual-scheme NAME`` picks one from :data:`SCHEMES`.
"""

import importlib
import pkgutil

from deepnet_fairseq.schemes.base import (
    SCHEMES,
    DeepNetConfigError,
    ResidualScheme,
    SchemeContext,
    build_scheme,
    scheme_class,
)

HELPER_MODULES = ("base", "init")
for _module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
    if _module not in HELPER_MODULES:
        importlib.import_module(f"{__name__}.{_module}")

SCHEME_NAMES = tuple(SCHEMES)

__all__ = [
    "SCHEMES", "SCHEME_NAMES", "ResidualScheme", "SchemeContext", "DeepNetConfigError", "build_scheme", "scheme_class"
]
