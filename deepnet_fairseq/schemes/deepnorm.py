"""DeepNorm (Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers", Sec. 4).

Sub-layer: ``x <- LN(alpha * x + G(x))`` (Post-LN with an up-weighted skip).
Init (paper, Fig. 2): ``xavier_normal_(W, gain=beta)`` for fc1, fc2, v_proj and out_proj (self- and
cross-attention), ``xavier_normal_(W, gain=1)`` for q_proj and k_proj, all their biases zero.

The ``torchscale`` variant reproduces microsoft/torchscale's code instead: PyTorch's default
``nn.Linear`` init (kaiming-uniform weights, non-zero uniform biases) for all six projections, then
weights *and* biases of fc1, fc2, v_proj and out_proj multiplied by beta.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from deepnet_fairseq.schemes.base import ResidualScheme

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
        raise ValueError(f"--deepnorm-init must be one of {', '.join(DEEPNORM_INITS)}, got {variant!r}")
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


@dataclass(frozen=True)
class DeepNormScheme(ResidualScheme):
    """DeepNorm for one side of a model: residual weight ``alpha``, init gain ``beta``."""

    alpha: float
    beta: float
    init: str = "paper"

    name = "deepnorm"

    def combine(self, branch: Tensor, residual: Tensor) -> Tensor:
        return residual * self.alpha + branch

    def initialize_layer(self, layer: nn.Module) -> None:
        deepnorm_init_(layer, self.beta, self.init)

    def describe(self) -> str:
        return f"deepnorm(alpha={self.alpha:.4f}, beta={self.beta:.4f}, init={self.init})"
