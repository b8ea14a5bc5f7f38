"""The plugin's command-line/config options: the run-level ones declared here, each scheme's own taken
from its ``Options`` dataclass in the scheme registry, merged into one dataclass.

``fairseq-train`` sees them through ``gen_parser_from_dataclass`` and ``fairseq-hydra-train`` through
the same field names in YAML, so both entry points share one definition.  Adding a scheme with a flag
touches only the scheme's module: its ``Options`` field becomes a flag here and is owned by the scheme
(refused with any other ``--residual-scheme``).
"""

import typing
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Dict, Iterable, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from deepnet_fairseq.schemes import SCHEME_NAMES, SCHEMES, DeepNetConfigError


@dataclass
class RunOptions:
    """Options of every deepnet model, whatever its scheme."""

    residual_scheme: ChoiceEnum(SCHEME_NAMES) = field(
        default="post-ln", metadata={"help": "how every sub-layer combines x and G(x), and its init (see README)"}
    )
    deepnorm: bool = field(default=False, metadata={"help": "alias of --residual-scheme deepnorm"})
    allow_residual_scheme_change: bool = field(
        default=False,
        metadata={
            "help": "load a checkpoint trained with another residual scheme or other scheme constants (resume, "
            "fine-tune, --model-overrides) although the same weights then compute a different network"
        },
    )
    log_stability: bool = field(
        default=False,
        metadata={"help": "log per-sub-layer LN input norm, branch ratio, gradient norm and the model update"},
    )
    stability_interval: Optional[int] = field(
        default=None, metadata={"help": "with --log-stability: measure every N updates (default 50)"}
    )
    stop_on_divergence_patience: Optional[int] = field(
        default=None,
        metadata={
            "help": "exit with code 3 (no traceback) when an update fails with NaN/inf gradients or P consecutive "
            "updates are skipped or have a non-finite loss"
        },
    )


def _scheme_fields() -> Dict[str, tuple]:
    """``{flag field: (owning scheme name, dataclass field, its type)}`` from every registered scheme's
    ``Options`` (types evaluated: a scheme module may use postponed annotations)."""
    found: Dict[str, tuple] = {}
    for name, scheme in SCHEMES.items():
        types = typing.get_type_hints(scheme.Options)
        for spec in fields(scheme.Options):
            if spec.name in found or spec.name in RunOptions.__dataclass_fields__:
                raise TypeError(f"option {spec.name!r} of scheme {name!r} is declared twice")
            found[spec.name] = (name, spec, types[spec.name])
    return found


SCHEME_FIELDS = _scheme_fields()
# which scheme each scheme-specific option belongs to
OPTION_OWNERS: Dict[str, str] = {option: owner for option, (owner, _, _) in SCHEME_FIELDS.items()}

DeepNetOptions = make_dataclass(
    "DeepNetOptions",
    [(spec.name, kind, field(default=spec.default, metadata=dict(spec.metadata)))
     for spec, kind in [(spec, spec.type) for spec in fields(RunOptions)]
     + [(spec, kind) for _, spec, kind in SCHEME_FIELDS.values()]],
    bases=(FairseqDataclass,),
)
DeepNetOptions.__doc__ = "Every option of the plugin: :class:`RunOptions` plus each scheme's ``Options``."

OPTION_DEFAULTS = {spec.name: spec.default for spec in fields(DeepNetOptions)}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def fill_option_defaults(args) -> None:
    """Give ``args`` every plugin option it lacks (architecture functions, old checkpoints)."""
    for name, default in OPTION_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)


def resolve_scheme_name(args) -> str:
    """The selected scheme, with ``--deepnorm`` as an alias of ``--residual-scheme deepnorm``."""
    name = str(getattr(args, "residual_scheme", None) or "post-ln")
    if getattr(args, "deepnorm", False):
        if name not in ("post-ln", "deepnorm"):
            raise DeepNetConfigError(f"--deepnorm contradicts --residual-scheme {name}; use one of them")
        name = "deepnorm"
    if name not in SCHEME_NAMES:
        raise DeepNetConfigError(f"--residual-scheme {name!r} is unknown; choose one of {', '.join(SCHEME_NAMES)}")
    return name


def validate_run_options(args, name: str, sides: Iterable[str]) -> None:
    """Refuse contradictory run-level flags before any layer is built (messages name the flags):
    another scheme's options, LayerNorm flags the scheme has no place for, the instruments' counts."""
    for option, (owner, spec, _) in SCHEME_FIELDS.items():
        value = getattr(args, option, None)
        accepted = (None, False, "", spec.metadata["scheme_default"] if spec.metadata["stored_by_old_checkpoints"]
                    else None)
        if owner != name and value not in accepted:
            raise DeepNetConfigError(f"{flag(option)} only applies with --residual-scheme {owner}"
                                     + (" (or --deepnorm)" if owner == "deepnorm" else ""))
    layer_norm = SCHEMES[name].layer_norm
    if layer_norm in ("post", "none"):
        for side in sides:
            if getattr(args, f"{side}_normalize_before", False):
                kind = "a Post-LN" if layer_norm == "post" else "a LayerNorm-free"
                raise DeepNetConfigError(
                    f"--residual-scheme {name} is {kind} method: remove --{side}-normalize-before "
                    "(Pre-LN and its final LayerNorm)"
                )
    if layer_norm == "none" and getattr(args, "layernorm_embedding", False):
        raise DeepNetConfigError(f"--residual-scheme {name} has no LayerNorm: remove --layernorm-embedding")
    interval = getattr(args, "stability_interval", None)
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
        raise DeepNetConfigError(f"--stability-interval must be a positive integer, got {interval!r}")
    if interval is not None and not getattr(args, "log_stability", False):
        raise DeepNetConfigError("--stability-interval only applies with --log-stability")
    patience = getattr(args, "stop_on_divergence_patience", None)
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise DeepNetConfigError(f"--stop-on-divergence-patience must be a positive integer, got {patience!r}")


def validate_shapes(args, sides) -> None:
    """Layer counts, widths and head counts a Transformer can be built with (messages name the flag)."""
    for side in sides:
        for name in (f"{side}_layers", f"{side}_embed_dim", f"{side}_ffn_embed_dim", f"{side}_attention_heads"):
            value = getattr(args, name, None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DeepNetConfigError(f"{flag(name)} must be a positive integer, got {value!r}")
        dim, heads = getattr(args, f"{side}_embed_dim"), getattr(args, f"{side}_attention_heads")
        if dim % heads:
            raise DeepNetConfigError(f"{flag(side + '_embed_dim')} ({dim}) must be divisible by "
                              f"{flag(side + '_attention_heads')} ({heads})")
