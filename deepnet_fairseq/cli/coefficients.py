"""``deepnet-coefficients``: print DeepNorm's alpha/beta for given depths as a Markdown table.

    deepnet-coefficients                       # the common depths (6, 12, 18, 50, 100, 250, 500)
    deepnet-coefficients --layers 24 --init torchscale
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from deepnet_fairseq.coefficients import (
    PAPER_ENCODER_BETA_CONSTANT,
    TORCHSCALE_ENCODER_BETA_CONSTANT,
    deepnorm_coefficients,
)

COMMON_DEPTHS = (6, 12, 18, 50, 100, 250, 500)


def coefficient_table(depths: Sequence[int], encoder_beta_constant: float = PAPER_ENCODER_BETA_CONSTANT) -> str:
    """Markdown table: N=M, encoder-decoder (encoder and decoder side), encoder-only/decoder-only."""
    rows = [
        "| N=M | enc-dec encoder alpha | enc-dec encoder beta | enc-dec decoder alpha | enc-dec decoder beta "
        "| enc-only / dec-only alpha | enc-only / dec-only beta |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for depth in depths:
        both = deepnorm_coefficients(depth, depth, encoder_beta_constant=encoder_beta_constant)
        single = deepnorm_coefficients(depth, None)
        rows.append(
            f"| {depth} | {both.encoder_alpha:.4f} | {both.encoder_beta:.4f} | {both.decoder_alpha:.4f} "
            f"| {both.decoder_beta:.4f} | {single.encoder_alpha:.4f} | {single.encoder_beta:.4f} |"
        )
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=list(COMMON_DEPTHS), help="depths N=M")
    parser.add_argument("--init", choices=("paper", "torchscale"), default="paper",
                        help="torchscale uses 1.15 instead of 0.87 for the enc-dec encoder beta")
    args = parser.parse_args(argv)
    constant = TORCHSCALE_ENCODER_BETA_CONSTANT if args.init == "torchscale" else PAPER_ENCODER_BETA_CONSTANT
    try:
        print(coefficient_table(args.layers, constant))
    except ValueError as err:
        parser.error(f"--layers: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
