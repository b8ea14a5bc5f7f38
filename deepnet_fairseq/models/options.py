"""The plugin's command-line/config options, declared once as a dataclass.

``fairseq-train`` sees them through ``gen_parser_from_dataclass`` and ``fairseq-hydra-train`` through
the same field names in YAML, so both entry points share one definition.
"""


import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from deepnet_fairseq.coefficients import (
    PAPER_ENCODER_BETA_CONSTANT,
    TORCHSCALE_ENCODER_BETA_CONSTANT,
    deepnorm_coefficients,
)
from deepnet_fairseq.schemes import DeepNormScheme, PostLNScheme, ResidualScheme
from deepnet_fairseq.schemes.deepnorm import DEEPNORM_INITS


class DeepNetConfigError(ValueError):
    """A contradictory or out-of-range plugin option, raised before any model is built."""


@dataclass
class DeepNormOptions(FairseqDataclass):
    deepnorm: bool = field(
        default=False,
        metadata={"help": "DeepNorm: Post-LN sub-layers LN(alpha*x + G(x)) and beta-scaled Xavier init"},
    )
    deepnorm_init: ChoiceEnum(DEEPNORM_INITS) = field(
        default="paper",
        metadata={
            "help": "paper: xavier_normal(gain=beta) on fc1/fc2/v_proj/out_proj, gain 1 on q/k, zero biases; "
            "torchscale: nn.Linear default init scaled by beta (biases too), encoder constant 1.15"
        },
    )
    deepnorm_alpha: Optional[str] = field(
        default=None,
        metadata={"help": "override alpha: one value for both sides, or ENCODER,DECODER"},
    )
    deepnorm_beta: Optional[str] = field(
        default=None,
        metadata={"help": "override beta: one value for both sides, or ENCODER,DECODER"},
    )


OPTION_DEFAULTS = {name: f.default for name, f in DeepNormOptions.__dataclass_fields__.items()}


def fill_option_defaults(args) -> None:
    """Give ``args`` every plugin option it lacks (architecture functions, old checkpoints)."""
    for name, default in OPTION_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)


def parse_side_values(value: Optional[str], flag: str) -> Tuple[Optional[float], Optional[float]]:
    """Parse ``"V"`` (both sides) or ``"ENC,DEC"`` into positive finite floats."""
    if value is None or value == "":
        return None, None
    parts = [p.strip() for p in str(value).split(",")]
    if len(parts) not in (1, 2):
        raise DeepNetConfigError(f"{flag} takes one value or ENCODER,DECODER, got {value!r}")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise DeepNetConfigError(f"{flag} takes numbers (one value or ENCODER,DECODER), got {value!r}") from None
    for number in numbers:
        if not math.isfinite(number) or number <= 0:
            raise DeepNetConfigError(f"{flag} values must be finite and > 0, got {value!r}")
    return (numbers[0], numbers[0]) if len(numbers) == 1 else (numbers[0], numbers[1])


def validate_options(args, encoder_layers: int, decoder_layers: int) -> None:
    """Refuse contradictory flags before any layer is built (messages name the flags)."""
    if not args.deepnorm:
        for name in ("deepnorm_alpha", "deepnorm_beta"):
            if getattr(args, name, None) not in (None, ""):
                flag = "--" + name.replace("_", "-")
                raise DeepNetConfigError(f"{flag} only applies with --deepnorm")
        return
    if encoder_layers and getattr(args, "encoder_normalize_before", False):
        raise DeepNetConfigError(
            "--deepnorm is a Post-LN method: remove --encoder-normalize-before (Pre-LN and its final LayerNorm)"
        )
    if decoder_layers and getattr(args, "decoder_normalize_before", False):
        raise DeepNetConfigError(
            "--deepnorm is a Post-LN method: remove --decoder-normalize-before (Pre-LN and its final LayerNorm)"
        )
    parse_side_values(args.deepnorm_alpha, "--deepnorm-alpha")
    parse_side_values(args.deepnorm_beta, "--deepnorm-beta")


def build_schemes(args, encoder_layers: int, decoder_layers: int) -> Tuple[ResidualScheme, ResidualScheme]:
    """Residual schemes ``(encoder, decoder)`` for a model with the given true layer counts.

    ``encoder_layers == 0`` means decoder-only (language model), so the decoder-only constants apply.
    """
    validate_options(args, encoder_layers, decoder_layers)
    if not args.deepnorm:
        return PostLNScheme(), PostLNScheme()
    init = str(args.deepnorm_init)
    constant = TORCHSCALE_ENCODER_BETA_CONSTANT if init == "torchscale" else PAPER_ENCODER_BETA_CONSTANT
    coeffs = deepnorm_coefficients(encoder_layers or None, decoder_layers or None, encoder_beta_constant=constant)
    alpha_override = parse_side_values(args.deepnorm_alpha, "--deepnorm-alpha")
    beta_override = parse_side_values(args.deepnorm_beta, "--deepnorm-beta")

    def side(index: int, alpha: Optional[float], beta: Optional[float]) -> ResidualScheme:
        if alpha is None:
            return PostLNScheme()
        return DeepNormScheme(
            alpha=alpha_override[index] or alpha,
            beta=beta_override[index] or beta,
            init=init,
        )

    return (
        side(0, coeffs.encoder_alpha, coeffs.encoder_beta),
        side(1, coeffs.decoder_alpha, coeffs.decoder_beta),
    )
