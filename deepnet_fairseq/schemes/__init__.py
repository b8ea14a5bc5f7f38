"""Residual schemes: how a sub-layer combines its input x with its branch G(x), and how it starts.

Importing this package registers every scheme; ``--residual-scheme NAME`` picks one from
:data:`SCHEMES`.
"""

from deepnet_fairseq.schemes import (  # noqa: F401  (registration)
    admin,
    deepnorm,
    dlcl,
    ds_init,
    normformer,
    post_ln,
    post_ln_init,
    pre_ln,
    r_fixup,
    rezero,
    sandwich_ln,
    sub_ln,
    t_fixup,
)
from deepnet_fairseq.schemes.base import SCHEMES, DeepNetConfigError, ResidualScheme, SchemeContext, build_scheme

SCHEME_NAMES = tuple(SCHEMES)

__all__ = ["SCHEMES", "SCHEME_NAMES", "ResidualScheme", "SchemeContext", "DeepNetConfigError", "build_scheme"]
