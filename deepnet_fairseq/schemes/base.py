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

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Type

from torch import Tensor, nn


class DeepNetConfigError(ValueError):
    """A contradictory or out-of-range option, raised before any model is built."""


def option(default: object = None, help: str = "", scheme_default: object = None,
           stored_by_old_checkpoints: bool = False):
    """A field of a scheme's options dataclass (one command-line flag / YAML key).

    ``default`` is what the flag holds when not given (``None``, ``False`` for switches), so that a
    flag given without its scheme can be refused; ``scheme_default`` is the value the scheme then uses.
    ``stored_by_old_checkpoints``: checkpoints of runs with another scheme stored the scheme default,
    which is therefore not an error there.
    """
    metadata = {"help": help, "scheme_default": scheme_default, "stored_by_old_checkpoints": stored_by_old_checkpoints}
    return field(default=default, metadata=metadata)


@dataclass
class NoOptions:
    """The options of a scheme without flags of its own."""


@dataclass(frozen=True)
class SchemeContext:
    """Where a scheme is used: which side, the true depths of the model, and the scheme's resolved options.

    ``encoder_layers`` is 0 for a decoder-only model, ``decoder_layers`` 0 for an encoder-only one.
    ``options`` is an instance of the scheme's :attr:`ResidualScheme.Options` with every unset flag
    replaced by its ``scheme_default`` (:func:`resolve_options`); ``share_all_embeddings`` is the
    model's ``--share-all-embeddings`` (T-Fixup scales a shared table once).
    """

    side: str
    encoder_layers: int
    decoder_layers: int
    options: Any = None
    share_all_embeddings: bool = False

    @property
    def layers(self) -> int:
        """Number of layers in this side's stack (N for the encoder, M for the decoder)."""
        return self.encoder_layers if self.side == "encoder" else self.decoder_layers

    @property
    def sublayers_per_layer(self) -> int:
        """2 in an encoder or a decoder-only LM (no cross-attention), 3 in an enc-dec decoder."""
        return 3 if self.side == "decoder" and self.encoder_layers else 2


class ResidualScheme:
    """Base class: vanilla residual ``x + G(x)`` and fairseq's own initialisation.

    A scheme owns everything about itself: its flags (:attr:`Options`, a dataclass whose field names
    are the flags, ``--`` and dashes added), their validation (:meth:`validate`), where its LayerNorms
    sit (:attr:`layer_norm`), its init, and its divergence hint (:meth:`divergence_hint`).
    """

    name: str = "post-ln"
    layer_norm: str = "post"
    # the network the scheme computes; init-only variants of another scheme name that one
    network: Optional[str] = None
    Options: ClassVar[type] = NoOptions

    def __init__(self, context: SchemeContext):
        self.context = context
        self.options = context.options if context.options is not None else resolve_options(self.Options, None)

    @classmethod
    def validate(cls, options, run: Mapping[str, object], sides: Dict[str, int]) -> None:
        """Refuse option values this scheme cannot use, once per model build, before any scheme object
        exists.  ``options`` are the resolved :attr:`Options`; ``run`` the run-level settings
        (``fp16``, ...); ``sides`` the trained depth of each side the model has.  Raises
        :class:`DeepNetConfigError` naming the flag."""

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

    def divergence_hint(self) -> Optional[str]:
        """What to try, besides the learning-rate/warm-up/batch advice, when training with this scheme
        diverges (the divergence report appends it); ``None`` for nothing more."""
        return "--residual-scheme deepnorm"


SCHEMES: Dict[str, Type[ResidualScheme]] = {}


def register_scheme(cls):
    """Class decorator: make a scheme available to ``--residual-scheme`` under ``cls.name``."""
    if cls.name in SCHEMES:
        raise ValueError(f"residual scheme {cls.name!r} registered twice")
    SCHEMES[cls.name] = cls
    return cls


def scheme_class(name: str) -> Type[ResidualScheme]:
    """The registered scheme called ``name``; raises :class:`DeepNetConfigError` listing the choices."""
    try:
        return SCHEMES[name]
    except KeyError:
        choices = ", ".join(sorted(SCHEMES))
        raise DeepNetConfigError(f"--residual-scheme {name!r} is unknown; choose one of {choices}") from None


def build_scheme(name: str, context: SchemeContext) -> ResidualScheme:
    """One scheme object for one side of one model."""
    return scheme_class(name)(context)


def resolve_options(options_class: type, source: object):
    """An ``options_class`` instance with each field read from ``source`` (a Namespace, a config or
    ``None``): an unset field (``None``) takes its ``scheme_default``."""
    values = {}
    for spec in fields(options_class):
        value = getattr(source, spec.name, None) if source is not None else None
        values[spec.name] = spec.metadata.get("scheme_default") if value is None else value
        if values[spec.name] is None:
            values[spec.name] = spec.default
    return options_class(**values)


def linear_modules(layer: nn.Module, names: Optional[Tuple[str, ...]] = None) -> Dict[str, nn.Linear]:
    """The attention and FFN ``nn.Linear`` sub-modules of a fairseq layer, by their fairseq names."""
    found = {}
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear) and (names is None or name in names):
            found[name] = module
    return found
