"""DeepNorm constants (Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers", Sec. 4.3).

Every sub-layer computes ``x <- LN(alpha * x + G(x))``; the weights of fc1, fc2, v_proj and out_proj
start as Xavier-normal with gain ``beta``.  With N encoder and M decoder layers:

========================  ==========================  ===========================
architecture              alpha                       beta
========================  ==========================  ===========================
encoder-only              (2N)^(1/4)                  (8N)^(-1/4)
decoder-only              (2M)^(1/4)                  (8M)^(-1/4)
encoder-decoder, encoder  0.81 (N^4 M)^(1/16)         0.87 (N^4 M)^(-1/16)
encoder-decoder, decoder  (3M)^(1/4)                  (12M)^(-1/4)
========================  ==========================  ===========================

The official torchscale code divides the encoder weights by ``(N^4 M)^(1/16) / 1.15``, i.e. it
uses ``1.15`` where the paper has ``0.87`` (``encoder_beta_constant`` selects it).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

PAPER_ENCODER_BETA_CONSTANT = 0.87
TORCHSCALE_ENCODER_BETA_CONSTANT = 1.15


class DeepNormCoefficients(NamedTuple):
    """alpha (residual up-weighting) and beta (init gain) per side; ``None`` for an absent side."""

    encoder_alpha: Optional[float]
    encoder_beta: Optional[float]
    decoder_alpha: Optional[float]
    decoder_beta: Optional[float]


def _depth(value: object, name: str) -> int:
    """Validate a layer count: 0/None mean "side absent", otherwise a positive integer."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a non-negative integer number of layers, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer number of layers, got {value!r}")
    return int(value)


def deepnorm_coefficients(
    encoder_layers: Optional[int],
    decoder_layers: Optional[int],
    encoder_beta_constant: float = PAPER_ENCODER_BETA_CONSTANT,
) -> DeepNormCoefficients:
    """Return DeepNorm's ``(encoder_alpha, encoder_beta, decoder_alpha, decoder_beta)``.

    ``encoder_layers`` (N) or ``decoder_layers`` (M) may be 0/None for a decoder-only or
    encoder-only model; the other side's entries are then ``None``.  At least one side must have
    layers.  ``encoder_beta_constant`` is the encoder-decoder encoder-side factor: 0.87 in the
    paper, 1.15 in torchscale's code.
    """
    n = _depth(encoder_layers, "encoder_layers")
    m = _depth(decoder_layers, "decoder_layers")
    if n == 0 and m == 0:
        raise ValueError("encoder_layers and decoder_layers are both 0/None: at least one side needs layers")
    if n and m:
        return DeepNormCoefficients(
            encoder_alpha=0.81 * (n**4 * m) ** (1 / 16),
            encoder_beta=encoder_beta_constant * (n**4 * m) ** (-1 / 16),
            decoder_alpha=(3 * m) ** (1 / 4),
            decoder_beta=(12 * m) ** (-1 / 4),
        )
    if n:
        return DeepNormCoefficients((2 * n) ** (1 / 4), (8 * n) ** (-1 / 4), None, None)
    return DeepNormCoefficients(None, None, (2 * m) ** (1 / 4), (8 * m) ** (-1 / 4))
