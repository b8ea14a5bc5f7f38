"""Post-LN-init (DeepNet paper, Sec. 3): Post-LN whose layer l starts shrunk by k_l = N - l + 1.

After Xavier init, the weights of layer l (l = 1..N within each stack) are divided by
``k_l = N - l + 1``: the bottom layer by N, the top one unchanged.  The paper uses it to show that
Post-LN's instability comes from the size of the early model update, not the architecture.  The
paper names the FFN output projection as its example; ``--post-ln-init-scope all`` (default) scales
every attention/FFN weight of the layer, ``ffn-out`` only fc2.
"""

from dataclasses import dataclass
from typing import Dict, Mapping, Optional

from fairseq.dataclass import ChoiceEnum
from torch import nn

from deepnet_fairseq.schemes.base import DeepNetConfigError, ResidualScheme, linear_modules, option, register_scheme
from deepnet_fairseq.schemes.init import xavier_ffn_

POST_LN_INIT_SCOPES = ("all", "ffn-out")


@dataclass
class PostLNInitOptions:
    """``--residual-scheme post-ln-init``."""

    post_ln_init_scope: Optional[ChoiceEnum(POST_LN_INIT_SCOPES)] = option(
        help="post-ln-init: shrink all linears of layer l (default) or only fc2", scheme_default="all"
    )


@register_scheme
class PostLNInitScheme(ResidualScheme):
    name = "post-ln-init"
    layer_norm = "post"
    network = "post-ln"  # an initialisation of Post-LN
    Options = PostLNInitOptions

    @classmethod
    def validate(cls, options: PostLNInitOptions, run: Mapping[str, object], sides: Dict[str, int]) -> None:
        if str(options.post_ln_init_scope) not in POST_LN_INIT_SCOPES:
            raise DeepNetConfigError(f"--post-ln-init-scope must be one of {', '.join(POST_LN_INIT_SCOPES)}")

    def __init__(self, context):
        super().__init__(context)
        self.scope = str(self.options.post_ln_init_scope)

    def initialize_layer(self, layer: nn.Module, index: int) -> None:
        xavier_ffn_(layer)
        shrink = self.context.layers - index + 1
        names = ("fc2",) if self.scope == "ffn-out" else None
        for module in linear_modules(layer, names).values():
            module.weight.data.div_(shrink)

    def init_settings(self) -> dict:
        return {"layers": self.context.layers, "scope": self.scope}

    def describe(self) -> str:
        return f"post-ln-init(k_l = {self.context.layers} - l + 1, scope={self.scope})"
