"""The interface every residual scheme implements.

A fairseq Transformer sub-layer (self-attention, cross-attention or FFN) computes a branch G(x) and
then calls ``residual_connection(G(x), x)``; in Post-LN the LayerNorm follows.  A scheme decides that
combination and how the layer's weights are initialised.  One scheme object serves one side
(encoder or decoder) of a model, because constants such as DeepNorm's alpha depend on the side.
"""

from __future__ import annotations

from torch import Tensor, nn


class ResidualScheme:
    """Base class: vanilla residual ``x + G(x)`` and fairseq's own initialisation."""

    name: str = "post-ln"

    def combine(self, branch: Tensor, residual: Tensor) -> Tensor:
        """Return the sub-layer output before its (Post-LN) LayerNorm."""
        return residual + branch

    def initialize_layer(self, layer: nn.Module) -> None:
        """Re-initialise a freshly built encoder or decoder layer in place (default: keep fairseq's)."""

    def describe(self) -> str:
        """A short human-readable summary for logs."""
        return self.name
