"""DS-Init (Zhang, Titov & Sennrich 2019, "Improving Deep Transformer with Depth-Scaled
Initialization and Merged Attention"): Post-LN whose layer l starts from
``U(-gamma * a / l^e, +gamma * a / l^e)``, ``gamma = sqrt(6 / (fan_in + fan_out))`` (Xavier's bound).

The paper has ``e = 1/2``; its reference code (bzhangGo/zero, TensorFlow ``variance_scaling`` whose
scale multiplies the *variance*) effectively uses ``e = 1/4``.  Default: the paper
(``--ds-init-exponent 0.5``); ``--ds-init-alpha`` is the paper's a in (0, 1] (default 1).  Biases zero.
"""

from torch import nn

from deepnet_fairseq.schemes.base import DeepNetConfigError, ResidualScheme, linear_modules, register_scheme
from deepnet_fairseq.schemes.init import xavier_bound


@register_scheme
class DSInitScheme(ResidualScheme):
    name = "ds-init"
    layer_norm = "post"
    network = "post-ln"  # an initialisation of Post-LN

    def __init__(self, context):
        super().__init__(context)
        self.alpha = float(context.option("ds_init_alpha", 1.0))
        self.exponent = float(context.option("ds_init_exponent", 0.5))
        if not 0 < self.alpha <= 1:
            raise DeepNetConfigError(f"--ds-init-alpha must be in (0, 1], got {self.alpha}")
        if self.exponent not in (0.5, 0.25):
            raise DeepNetConfigError(
                f"--ds-init-exponent must be 0.5 (paper) or 0.25 (reference code), got {self.exponent}"
            )

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
