"""fairseq Transformer layers whose residual connection and init are delegated to a residual scheme.

Submodule and parameter names are fairseq's own (``self_attn``, ``encoder_attn``, ``fc1``, ``fc2``,
``self_attn_layer_norm``, ...), so state dicts and fairseq tools work unchanged; schemes only add
parameters of their own.  fairseq's layer ``forward`` calls ``residual_connection`` once per
sub-layer that actually ran; a decoder layer with cross-attention called with ``encoder_out=None``
skips the cross-attention sub-layer, so counting calls would mislabel the FFN.  Instead, a forward
pre-hook on the module that opens each sub-layer (``self_attn``, ``encoder_attn``, ``fc1``) records
which sub-layer is running, and ``residual_connection`` consumes that label.  The hooks are
module-level functions bound with ``functools.partial``, so ``copy.deepcopy`` of the model (fairseq's
EMA) rebinds them to the copied layer; activation checkpointing re-runs the forward, hooks included,
and incremental decoding calls the same modules.

Other code observes the residual connections through :meth:`SchemeLayerMixin.register_residual_hook`
(``hook(layer, sublayer, branch, residual)``, called before the scheme combines them; a
:class:`~torch.utils.hooks.RemovableHandle` removes it).  Residual hooks belong to whoever registered
them on this layer object: ``copy.deepcopy`` (EMA) and pickling give the copy none.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Callable, Dict, Tuple

from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from deepnet_fairseq.schemes.base import ResidualScheme

# the submodule whose call opens each sub-layer of a fairseq layer
SUBLAYER_ENTRY: Dict[str, str] = {"self_attn": "self_attn", "encoder_attn": "encoder_attn", "ffn": "fc1"}

# hook(layer, sublayer, branch, residual), called by residual_connection before the scheme combines
ResidualHook = Callable[[nn.Module, str, Tensor, Tensor], None]


def _enter_sublayer(layer: nn.Module, sublayer: str, module: nn.Module, args) -> None:
    """Forward pre-hook on a sub-layer's first module: mark ``sublayer`` as the one running."""
    layer.running_sublayer = sublayer


class SchemeLayerMixin:
    """Delegates ``residual_connection`` to ``self.scheme`` with the name of the sub-layer that ran."""

    scheme: ResidualScheme
    sublayers: Tuple[str, ...]

    def _attach_scheme(self, scheme: ResidualScheme, index: int, sublayers: Tuple[str, ...]) -> None:
        self.scheme = scheme
        self.layer_index = index
        self.sublayers = sublayers
        self.running_sublayer = None
        self._residual_hooks: Dict[int, ResidualHook] = OrderedDict()
        for sublayer in sublayers:
            entry = self.get_submodule(SUBLAYER_ENTRY[sublayer])
            entry.register_forward_pre_hook(partial(_enter_sublayer, self, sublayer))
        scheme.prepare_layer(self, index)
        scheme.initialize_layer(self, index)

    def register_residual_hook(self, hook: ResidualHook) -> RemovableHandle:
        """Call ``hook(layer, sublayer, branch, residual)`` on every residual connection of this layer,
        before the scheme combines ``branch`` (G(x)) and ``residual`` (x); returns the handle that removes
        it.  A deep copy of the layer starts without residual hooks."""
        handle = RemovableHandle(self._residual_hooks)
        self._residual_hooks[handle.id] = hook
        return handle

    def __getstate__(self) -> dict:
        # deepcopy (fairseq's EMA) and pickling: the copy carries no residual hooks (whoever registered one
        # holds a handle to this layer's hooks, not the copy's)
        state = super().__getstate__()
        state["_residual_hooks"] = OrderedDict()
        return state

    def residual_connection(self, x: Tensor, residual: Tensor) -> Tensor:
        sublayer = self.running_sublayer
        if sublayer is None:
            entries = ", ".join(SUBLAYER_ENTRY[s] for s in self.sublayers)
            raise RuntimeError(
                f"{type(self).__name__}.residual_connection was called without one of its sub-layer modules "
                f"({entries}) running first, so the sub-layer to combine is unknown"
            )
        self.running_sublayer = None
        if self._residual_hooks:
            for hook in tuple(self._residual_hooks.values()):
                hook(self, sublayer, x, residual)
        return self.scheme.combine(self, sublayer, x, residual)


class DeepNetEncoderLayer(SchemeLayerMixin, TransformerEncoderLayerBase):
    """Encoder layer: two sub-layers (self-attention, FFN)."""

    def __init__(self, cfg, scheme: ResidualScheme, index: int = 1, return_fc: bool = False):
        super().__init__(cfg, return_fc=return_fc)
        self._attach_scheme(scheme, index, ("self_attn", "ffn"))


class DeepNetDecoderLayer(SchemeLayerMixin, TransformerDecoderLayerBase):
    """Decoder layer: three sub-layers (self-attention, cross-attention, FFN), two without encoder.

    A layer built with cross-attention but called with ``encoder_out=None`` runs only self-attention
    and FFN (fairseq skips the cross-attention block); each is still combined as itself.
    """

    def __init__(self, cfg, scheme: ResidualScheme, index: int = 1, no_encoder_attn: bool = False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn)
        sublayers = ("self_attn", "ffn") if no_encoder_attn else ("self_attn", "encoder_attn", "ffn")
        self._attach_scheme(scheme, index, sublayers)
