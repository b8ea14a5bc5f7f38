"""The interface every residual scheme implements, and the registry that names them.

A fairseq Transformer sub-layer (self-attention, cross-attention or FFN) computes a branch G(x) and
then calls ``residual_connection(G(x), x)``; in Post-LN its LayerNorm follows, in Pre-LN the
LayerNorm came before G.  A scheme decides

* where the LayerNorms are (:attr:`ResidualScheme.layer_norm`: ``"post"``, ``"pre"`` or ``"none"``),
* how a sub-layer combines x and G(x) (:meth:`ResidualScheme.combine`),
* what extra parameters or modules a layer gets (:meth:`ResidualScheme.prepare_layer`),
* how the layer's weights start (:meth:`ResidualScheme.initialize_layer`), and
* optional stack-level hooks (:meth:`ResidualScheme.prepare_stack`: DLCL's layer history,
  T-Fixup's embedding scaling).

One scheme object serves one side (encoder or decoder) of one model, because constants depend on
the side and the depths.  Layers call the scheme from inside their constructor, before fairseq's
activation checkpointing or FSDP wrapping touches the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from torch import Tensor, nn


class DeepNetConfigError(ValueError):
    """A contradictory or out-of-range option, raised before any model is built."""


@dataclass(frozen=True)
class SchemeContext:
    """Where a scheme is used: which side, and the true depths of the model.

    ``encoder_layers`` is 0 for a decoder-only model, ``decoder_layers`` 0 for an encoder-only one.
    ``args`` is the parsed option namespace (for scheme-specific options).
    """

    side: str
    encoder_layers: int
    decoder_layers: int
    args: object = None

    @property
    def layers(self) -> int:
        """Number of layers in this side's stack (N for the encoder, M for the decoder)."""
        return self.encoder_layers if self.side == "encoder" else self.decoder_layers

    @property
    def sublayers_per_layer(self) -> int:
        """2 in an encoder or a decoder-only LM (no cross-attention), 3 in an enc-dec decoder."""
        return 3 if self.side == "decoder" and self.encoder_layers else 2

    def option(self, name: str, default=None):
        value = getattr(self.args, name, None)
        return default if value is None else value


class ResidualScheme:
    """Base class: vanilla residual ``x + G(x)`` and fairseq's own initialisation."""

    name: str = "post-ln"
    layer_norm: str = "post"
    # the network the scheme computes; init-only variants of another scheme name that one
    network: Optional[str] = None

    def __init__(self, context: SchemeContext):
        self.context = context

    def combine(self, layer: nn.Module, sublayer: str, branch: Tensor, residual: Tensor) -> Tensor:
        """Return the sub-layer output (before its LayerNorm in Post-LN)."""
        return residual + branch

    def prepare_layer(self, layer: nn.Module, index: int) -> None:
        """Add extra parameters/modules/hooks to a freshly built layer (``index`` counts from 1)."""

    def initialize_layer(self, layer: nn.Module, index: int) -> None:
        """Re-initialise a freshly built layer in place (default: keep fairseq's init)."""

    def prepare_stack(self, stack: nn.Module) -> None:
        """Stack-level hooks, called once all layers of ``stack`` are built."""

    def settings(self) -> Dict[str, object]:
        """Resolved options and constants that change what the network computes (e.g. DeepNorm's alpha)."""
        return {}

    def init_settings(self) -> Dict[str, object]:
        """Resolved options and constants that only decide the initial weights (e.g. DeepNorm's beta)."""
        return {}

    def record(self) -> Dict[str, object]:
        """``{"scheme", "network", **settings(), "init": init_settings()}`` for this side.

        A checkpoint loads into a model whose record has the same ``network`` and settings
        (compared by :mod:`deepnet_fairseq.scheme_record`); ``scheme`` and ``init`` are shown, not compared.
        """
        return {"scheme": self.name, "network": self.network or self.name, **self.settings(),
                "init": self.init_settings()}

    def describe(self) -> str:
        """A short human-readable summary for logs."""
        return self.name


SCHEMES: Dict[str, Callable[[SchemeContext], ResidualScheme]] = {}


def register_scheme(cls):
    """Class decorator: make a scheme available to ``--residual-scheme`` under ``cls.name``."""
    if cls.name in SCHEMES:
        raise ValueError(f"residual scheme {cls.name!r} registered twice")
    SCHEMES[cls.name] = cls
    return cls


def build_scheme(name: str, context: SchemeContext) -> ResidualScheme:
    try:
        factory = SCHEMES[name]
    except KeyError:
        choices = ", ".join(sorted(SCHEMES))
        raise DeepNetConfigError(f"--residual-scheme {name!r} is unknown; choose one of {choices}") from None
    return factory(context)


def linear_modules(layer: nn.Module, names: Optional[Tuple[str, ...]] = None) -> Dict[str, nn.Linear]:
    """The attention and FFN ``nn.Linear`` sub-modules of a fairseq layer, by their fairseq names."""
    found = {}
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear) and (names is None or name in names):
            found[name] = module
    return found
