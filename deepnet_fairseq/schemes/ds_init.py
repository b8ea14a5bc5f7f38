"""DS-Init (Zhang, Titov & Sennrich 2019, "Improving Deep Transformer with Depth-Scaled
Initialization and Merged Attention"): Post-LN whose layer l starts from
``U(-gamma * a / l^e, +gamma * a / l^e)``, ``gamma = sqrt(6 / (fan_in + fan_out))`` (Xavier's bound).

The paper has ``e = 1/2``; its reference code (bzhangGo/zero, TensorFlow ``variance_scaling`` whose
scale multiplies the *variance*) effectively uses ``e = 1/4``.  Default: the paper
(``--ds-init-exponent 0.5``); ``--ds-init-alpha`` is the paper's a in (0, 1] (default 1).  Biases zero.
"""

from dataclasses import dataclass
from typing import Dict, Mapping, Optional

from torch import nn

from deepnet_fairseq.schemes.base import DeepNetConfigError, ResidualScheme, linear_modules, option, register_scheme
from deepnet_fairseq.schemes.init import xavier_bound


@dataclass
class DSInitOptions:
    """``--residual-scheme ds-init``."""

    ds_init_alpha: Optional[float] = option(help="ds-init: the paper's alpha in (0, 1]", scheme_default=1.0)
    ds_init_exponent: Optional[float] = option(
        help="ds-init: depth exponent, 0.5 (paper, default) or 0.25 (reference code)", scheme_default=0.5
    )


@register_scheme
class DSInitScheme(ResidualScheme):
    name = "ds-init"
    layer_norm = "post"
    network = "post-ln"  # an initialisation of Post-LN
    Options = DSInitOptions

    @classmethod
    def validate(cls, options: DSInitOptions, run: Mapping[str, object], sides: Dict[str, int]) -> None:
        if not 0 < float(options.ds_init_alpha) <= 1:
            raise DeepNetConfigError(f"--ds-init-alpha must be in (0, 1], got {float(options.ds_init_alpha)}")
        exponent = float(options.ds_init_exponent)
        if exponent not in (0.5, 0.25):
            raise DeepNetConfigError(f"--ds-init-exponent must be 0.5 (paper) or 0.25 (reference code), got {exponent}")

    def __init__(self, context):
        super().__init__(context)
        self.alpha = float(self.options.ds_init_alpha)
        self.exponent = float(self.options.ds_init_exponent)

    def initialize_layer(self, layer: nn.Module, index: int) -> None:
        for module in linear_modules(layer).values():
            bound = xavier_bound(module) * self.alpha / index**self.exponent
            nn.init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def init_settings(self) -> dict:
        return {"alpha": self.alpha, "exponent": self.exponent}

    def describe(self) -> str:
        return f"ds-init(alpha={self.alpha}, exponent={self.exponent})"
