"""R-Fixup: Fixup (Zhang, Dauphin & Ma 2019, "Fixup Initialization") for the Transformer, as
"R-Fixup" in the DeepNet paper's Table 1.  No LayerNorm; each residual branch is shifted by scalar
biases and multiplied by a scalar scale, and the branch's linear layers have no (trainable) bias:

* FFN: ``x <- x + s * fc2(b3 + relu(b2 + fc1(b1 + x)))``;
* attention: ``x <- x + s * (b_out + Attn(x + b_in))`` (cross-attention shifts only its query).

Init, with ``L`` the number of residual branches of the model (2N + 3M): fc1 = Xavier x L^(-1/2),
fc2 = 0, q/k/v = Xavier x L^(-1/6), out_proj = 0, shifts 0, scales 1.  Linear biases stay at zero
and frozen (fairseq's attention kernel needs a bias tensor).  Reference: hongyi-zhang/Fixup,
``transformer_zero.py``.  Not reproduced: the encoder-output shift/scale (``shift0``/``scale0``).
"""

from functools import partial

import torch
from torch import Tensor, nn

from deepnet_fairseq.schemes.base import ResidualScheme, linear_modules, register_scheme
from deepnet_fairseq.schemes.init import attention_modules, remove_layer_norms_


def _scalar(value: float) -> nn.Parameter:
    return nn.Parameter(torch.full((1,), float(value)))


# Hooks are module-level functions bound with functools.partial, so that copy.deepcopy of the model
# (fairseq's EMA) rebinds them to the copied layer instead of the original.
def _shift_input(layer: nn.Module, name: str, module: nn.Module, args):
    return (args[0] + getattr(layer, name),) + tuple(args[1:])


def _shift_output(layer: nn.Module, name: str, module: nn.Module, args, output):
    if isinstance(output, tuple):
        return (output[0] + getattr(layer, name),) + tuple(output[1:])
    return output + getattr(layer, name)


def _shift_attention_inputs(layer: nn.Module, sublayer: str, module: nn.Module, args, kwargs):
    bias = getattr(layer, f"rfixup_{sublayer}_bias_in")
    shifted = ("query", "key", "value") if sublayer == "self_attn" else ("query",)
    kwargs = dict(kwargs)
    for name in shifted:
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name] + bias
    return args, kwargs


@register_scheme
class RFixupScheme(ResidualScheme):
    name = "r-fixup"
    layer_norm = "none"

    def __init__(self, context):
        super().__init__(context)
        decoder_sublayers = 3 if context.encoder_layers else 2
        self.num_branches = 2 * context.encoder_layers + decoder_sublayers * context.decoder_layers

    def prepare_layer(self, layer: nn.Module, index: int) -> None:
        remove_layer_norms_(layer)
        for sublayer in layer.sublayers:
            setattr(layer, f"rfixup_{sublayer}_scale", _scalar(1.0))
        layer.rfixup_ffn_bias1, layer.rfixup_ffn_bias2, layer.rfixup_ffn_bias3 = _scalar(0), _scalar(0), _scalar(0)
        layer.fc1.register_forward_pre_hook(partial(_shift_input, layer, "rfixup_ffn_bias1"))
        layer.fc1.register_forward_hook(partial(_shift_output, layer, "rfixup_ffn_bias2"))
        layer.fc2.register_forward_pre_hook(partial(_shift_input, layer, "rfixup_ffn_bias3"))
        for sublayer, attention in attention_modules(layer):
            setattr(layer, f"rfixup_{sublayer}_bias_in", _scalar(0))
            setattr(layer, f"rfixup_{sublayer}_bias_out", _scalar(0))
            attention.register_forward_pre_hook(partial(_shift_attention_inputs, layer, sublayer), with_kwargs=True)
            attention.register_forward_hook(partial(_shift_output, layer, f"rfixup_{sublayer}_bias_out"))

    def initialize_layer(self, layer: nn.Module, index: int) -> None:
        for name, module in linear_modules(layer).items():
            if name == "fc1":
                nn.init.xavier_uniform_(module.weight)
                module.weight.data.mul_(self.num_branches ** (-1 / 2))
            elif name.endswith(("q_proj", "k_proj", "v_proj")):
                nn.init.xavier_uniform_(module.weight)
                module.weight.data.mul_(self.num_branches ** (-1 / 6))
            else:  # fc2 and out_proj start at zero
                nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
                module.bias.requires_grad_(False)

    def combine(self, layer: nn.Module, sublayer: str, branch: Tensor, residual: Tensor) -> Tensor:
        return residual + getattr(layer, f"rfixup_{sublayer}_scale") * branch

    def init_settings(self) -> dict:
        return {"branches": self.num_branches}

    def describe(self) -> str:
        return f"r-fixup(L={self.num_branches})"
