"""DeepNorm (Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers", Sec. 4).

Sub-layer: ``x <- LN(alpha * x + G(x))`` (Post-LN with an up-weighted skip).
Init (paper, Fig. 2): ``xavier_normal_(W, gain=beta)`` for fc1, fc2, v_proj and out_proj (self- and
cross-attention), ``xavier_normal_(W, gain=1)`` for q_proj and k_proj, all their biases zero.

The ``torchscale`` variant reproduces microsoft/torchscale's code instead: PyTorch's default
``nn.Linear`` init (kaiming-uniform weights, non-zero uniform biases) for all six projections, then
weights *and* biases of fc1, fc2, v_proj and out_proj multiplied by beta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

from fairseq.dataclass import ChoiceEnum
from torch import Tensor, nn

from deepnet_fairseq.coefficients import (
    PAPER_ENCODER_BETA_CONSTANT,
    TORCHSCALE_ENCODER_BETA_CONSTANT,
    deepnorm_coefficients,
)
from deepnet_fairseq.schemes.base import DeepNetConfigError, ResidualScheme, SchemeContext, option, register_scheme

DEEPNORM_INITS = ("paper", "torchscale")

# Sub-modules (names as in fairseq's Transformer layers) whose init gain is beta.
BETA_SCALED_PROJECTIONS = (
    "fc1",
    "fc2",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "encoder_attn.v_proj",
    "encoder_attn.out_proj",
)
# Sub-modules that keep gain 1 (Lemma 4.1: W^Q, W^K do not change the attention output bound).
UNIT_GAIN_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "encoder_attn.q_proj",
    "encoder_attn.k_proj",
)


def deepnorm_init_(layer: nn.Module, beta: float, variant: str = "paper") -> None:
    """Initialise one fairseq encoder/decoder layer in place for DeepNorm (see module docstring)."""
    if variant not in DEEPNORM_INITS:
        raise DeepNetConfigError(f"--deepnorm-init must be one of {', '.join(DEEPNORM_INITS)}, got {variant!r}")
    for name, module in layer.named_modules():
        if name in BETA_SCALED_PROJECTIONS:
            gain = beta
        elif name in UNIT_GAIN_PROJECTIONS:
            gain = 1.0
        else:
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"DeepNorm init expects {name} to be nn.Linear, found {type(module).__name__}")
        if variant == "paper":
            nn.init.xavier_normal_(module.weight, gain=gain)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        else:
            module.reset_parameters()
            module.weight.data.mul_(gain)
            if module.bias is not None:
                module.bias.data.mul_(gain)


@dataclass
class DeepNormOptions:
    """``--residual-scheme deepnorm`` (alias ``--deepnorm``)."""

    deepnorm_init: Optional[ChoiceEnum(DEEPNORM_INITS)] = option(
        help="deepnorm: paper (default): xavier_normal(gain=beta) on fc1/fc2/v_proj/out_proj, gain 1 on q/k, "
        "zero biases; torchscale: nn.Linear default init scaled by beta (biases too), encoder constant 1.15",
        scheme_default="paper",
        stored_by_old_checkpoints=True,
    )
    deepnorm_alpha: Optional[str] = option(help="deepnorm: override alpha, one value for both sides or ENCODER,DECODER")
    deepnorm_beta: Optional[str] = option(help="deepnorm: override beta, one value for both sides or ENCODER,DECODER")


@register_scheme
class DeepNormScheme(ResidualScheme):
    """DeepNorm for one side of a model: residual weight ``alpha``, init gain ``beta``.

    Constants from :func:`deepnet_fairseq.deepnorm_coefficients` for the model's true N and M,
    unless ``--deepnorm-alpha``/``--deepnorm-beta`` override them.
    """

    name = "deepnorm"
    layer_norm = "post"
    Options = DeepNormOptions

    @classmethod
    def validate(cls, options: DeepNormOptions, run: Mapping[str, object], sides: Dict[str, int]) -> None:
        if str(options.deepnorm_init) not in DEEPNORM_INITS:
            raise DeepNetConfigError(
                f"--deepnorm-init must be one of {', '.join(DEEPNORM_INITS)}, got {options.deepnorm_init!r}"
            )
        for name, value in (("--deepnorm-alpha", options.deepnorm_alpha), ("--deepnorm-beta", options.deepnorm_beta)):
            if len(sides) == 1 and value is not None and "," in str(value):
                raise DeepNetConfigError(f"{name} takes one value for a model with only an {next(iter(sides))}"
                                         f" (ENCODER,DECODER needs both), got {value!r}")
            parse_side_values(value, name)

    def __init__(self, context: SchemeContext):
        super().__init__(context)
        self.init = str(self.options.deepnorm_init)
        constant = TORCHSCALE_ENCODER_BETA_CONSTANT if self.init == "torchscale" else PAPER_ENCODER_BETA_CONSTANT
        coeffs = deepnorm_coefficients(
            context.encoder_layers or None, context.decoder_layers or None, encoder_beta_constant=constant
        )
        side = 0 if context.side == "encoder" else 1
        alpha_override = parse_side_values(self.options.deepnorm_alpha, "--deepnorm-alpha")[side]
        beta_override = parse_side_values(self.options.deepnorm_beta, "--deepnorm-beta")[side]
        default_alpha, default_beta = (
            (coeffs.encoder_alpha, coeffs.encoder_beta) if side == 0 else (coeffs.decoder_alpha, coeffs.decoder_beta)
        )
        self.alpha = alpha_override or default_alpha
        self.beta = beta_override or default_beta

    def combine(self, layer: nn.Module, sublayer: str, branch: Tensor, residual: Tensor) -> Tensor:
        return residual * self.alpha + branch

    def initialize_layer(self, layer: nn.Module, index: int) -> None:
        deepnorm_init_(layer, self.beta, self.init)

    def settings(self) -> dict:
        return {"alpha": self.alpha}

    def init_settings(self) -> dict:
        return {"beta": self.beta, "init": self.init}

    def divergence_hint(self) -> Optional[str]:
        return None  # already the scheme the report would suggest

    def describe(self) -> str:
        return f"deepnorm(alpha={self.alpha:.4f}, beta={self.beta:.4f}, init={self.init})"


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
