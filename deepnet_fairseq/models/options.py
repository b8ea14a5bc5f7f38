"""The plugin's command-line/config options, declared once as a dataclass, and their validation.

``fairseq-train`` sees them through ``gen_parser_from_dataclass`` and ``fairseq-hydra-train`` through
the same field names in YAML, so both entry points share one definition.
"""

from dataclasses import dataclass, field
from typing import Optional, Tuple

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from deepnet_fairseq.schemes import SCHEME_NAMES, DeepNetConfigError, ResidualScheme, SchemeContext, build_scheme
from deepnet_fairseq.schemes.deepnorm import DEEPNORM_INITS, parse_side_values


@dataclass
class DeepNormOptions(FairseqDataclass):
    residual_scheme: ChoiceEnum(SCHEME_NAMES) = field(
        default="post-ln", metadata={"help": "how every sub-layer combines x and G(x), and its init (see README)"}
    )
    deepnorm: bool = field(default=False, metadata={"help": "alias of --residual-scheme deepnorm"})
    deepnorm_init: Optional[ChoiceEnum(DEEPNORM_INITS)] = field(
        default=None,
        metadata={
            "help": "deepnorm: paper (default): xavier_normal(gain=beta) on fc1/fc2/v_proj/out_proj, gain 1 on q/k, "
            "zero biases; torchscale: nn.Linear default init scaled by beta (biases too), encoder constant 1.15"
        },
    )
    deepnorm_alpha: Optional[str] = field(
        default=None, metadata={"help": "deepnorm: override alpha, one value for both sides or ENCODER,DECODER"}
    )
    deepnorm_beta: Optional[str] = field(
        default=None, metadata={"help": "deepnorm: override beta, one value for both sides or ENCODER,DECODER"}
    )
    post_ln_init_scope: Optional[ChoiceEnum(["all", "ffn-out"])] = field(
        default=None, metadata={"help": "post-ln-init: shrink all linears of layer l (default) or only fc2"}
    )
    ds_init_alpha: Optional[float] = field(default=None, metadata={"help": "ds-init: the paper's alpha in (0, 1]"})
    ds_init_exponent: Optional[float] = field(
        default=None, metadata={"help": "ds-init: depth exponent, 0.5 (paper, default) or 0.25 (reference code)"}
    )
    admin_omega_trainable: bool = field(
        default=False, metadata={"help": "admin-closed: make omega a trainable vector per sub-layer"}
    )
    allow_rezero_fp16: bool = field(
        default=False, metadata={"help": "rezero: allow --fp16 (the DeepNet paper found ReZero unstable in fp16)"}
    )
    dlcl_history_window: Optional[int] = field(
        default=None, metadata={"help": "dlcl: combine only the last K layer outputs (-1 = all, default)"}
    )
    normformer_head_scale_position: Optional[ChoiceEnum(["paper", "fairseq"])] = field(
        default=None, metadata={"help": "normformer: head scale before W_o (paper, default) or after out_proj"}
    )
    normformer_scale_resids: bool = field(
        default=False, metadata={"help": "normformer: learned residual scale lambda on the FFN sub-layer"}
    )
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


OPTION_DEFAULTS = {name: f.default for name, f in DeepNormOptions.__dataclass_fields__.items()}
# scheme-specific options and the scheme they belong to; a value equal to the scheme's own default
# (e.g. --deepnorm-init paper, stored by checkpoints of runs without --deepnorm) is not an error
SCHEME_OPTION_DEFAULTS = {"deepnorm_init": "paper"}
OPTION_OWNERS = {
    "deepnorm_init": "deepnorm",
    "deepnorm_alpha": "deepnorm",
    "deepnorm_beta": "deepnorm",
    "post_ln_init_scope": "post-ln-init",
    "ds_init_alpha": "ds-init",
    "ds_init_exponent": "ds-init",
    "admin_omega_trainable": "admin-closed",
    "allow_rezero_fp16": "rezero",
    "dlcl_history_window": "dlcl",
    "normformer_head_scale_position": "normformer",
    "normformer_scale_resids": "normformer",
}


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


def validate_options(args, name: str, scheme: ResidualScheme, encoder_layers: int, decoder_layers: int) -> None:
    """Refuse contradictory flags before any layer is built (messages name the flags)."""
    for option, owner in OPTION_OWNERS.items():
        value = getattr(args, option, None)
        if owner != name and value not in (None, False, "", SCHEME_OPTION_DEFAULTS.get(option)):
            raise DeepNetConfigError(f"{flag(option)} only applies with --residual-scheme {owner}"
                              + (" (or --deepnorm)" if owner == "deepnorm" else ""))
    sides = [s for s, n in (("encoder", encoder_layers), ("decoder", decoder_layers)) if n]
    if scheme.layer_norm in ("post", "none"):
        for side in sides:
            if getattr(args, f"{side}_normalize_before", False):
                kind = "a Post-LN" if scheme.layer_norm == "post" else "a LayerNorm-free"
                raise DeepNetConfigError(
                    f"--residual-scheme {name} is {kind} method: remove --{side}-normalize-before "
                    "(Pre-LN and its final LayerNorm)"
                )
    if scheme.layer_norm == "none" and getattr(args, "layernorm_embedding", False):
        raise DeepNetConfigError(f"--residual-scheme {name} has no LayerNorm: remove --layernorm-embedding")
    if name == "rezero" and (getattr(args, "fp16", False) or getattr(args, "memory_efficient_fp16", False)):
        if not getattr(args, "allow_rezero_fp16", False):
            raise DeepNetConfigError(
                "--residual-scheme rezero with --fp16: the DeepNet paper found ReZero unstable in half precision "
                "even for shallow models; train in fp32/--bf16, or pass --allow-rezero-fp16 to insist"
            )
    interval = getattr(args, "stability_interval", None)
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
        raise DeepNetConfigError(f"--stability-interval must be a positive integer, got {interval!r}")
    if interval is not None and not getattr(args, "log_stability", False):
        raise DeepNetConfigError("--stability-interval only applies with --log-stability")
    patience = getattr(args, "stop_on_divergence_patience", None)
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise DeepNetConfigError(f"--stop-on-divergence-patience must be a positive integer, got {patience!r}")
    if name == "deepnorm":
        parse_side_values(getattr(args, "deepnorm_alpha", None), "--deepnorm-alpha")
        parse_side_values(getattr(args, "deepnorm_beta", None), "--deepnorm-beta")


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


def build_schemes(
    args, encoder_layers: int, decoder_layers: int
) -> Tuple[Optional[ResidualScheme], Optional[ResidualScheme]]:
    """Residual schemes ``(encoder, decoder)`` for a model with the given trained layer counts.

    ``encoder_layers == 0`` means decoder-only (language model), ``decoder_layers == 0`` encoder-only
    (``deepnet_roberta``); the absent side's scheme is ``None``, and a two-valued ``--deepnorm-alpha``/
    ``--deepnorm-beta`` is refused.  Pre-LN-family schemes switch on fairseq's ``normalize_before``
    on ``args`` (that is what defines them).  Raises :class:`DeepNetConfigError` naming the flag.
    """
    name = resolve_scheme_name(args)
    sides = {side: layers for side, layers in (("encoder", encoder_layers), ("decoder", decoder_layers)) if layers}
    if not sides:
        raise DeepNetConfigError("--encoder-layers/--decoder-layers: a model needs layers on at least one side")
    if len(sides) == 1 and name == "deepnorm":
        for option in ("deepnorm_alpha", "deepnorm_beta"):
            value = getattr(args, option, None)
            if value is not None and "," in str(value):
                raise DeepNetConfigError(f"{flag(option)} takes one value for a model with only an {next(iter(sides))}"
                                         f" (ENCODER,DECODER needs both), got {value!r}")
    schemes = {side: build_scheme(name, SchemeContext(side, encoder_layers, decoder_layers, args)) for side in sides}
    any_scheme = next(iter(schemes.values()))
    validate_options(args, name, any_scheme, encoder_layers, decoder_layers)
    if any_scheme.layer_norm == "pre":
        for side in sides:
            setattr(args, f"{side}_normalize_before", True)
    return schemes.get("encoder"), schemes.get("decoder")
