"""``deepnet-analyze``: the DeepNet paper's analysis figures at toy scale on the bundled data.

    deepnet-analyze fig5      # model update vs depth, Post-LN vs DeepNorm (paper Fig. 5)
    deepnet-analyze fig3-4    # 18L-18L gradient and LN-input norms (paper Figs. 3-4)
    deepnet-analyze all       # both (defaults finish in about 10 minutes on 2 CPU cores)

Each writes a CSV and a PNG under ``--out`` (default ``runs/analysis``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from deepnet_fairseq.cli.arguments import require_positive
from deepnet_fairseq.schemes import SCHEME_NAMES


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=("fig5", "fig3-4", "all"))
    parser.add_argument("--data", type=Path, help="fairseq-binarized data (default: the bundled Tatoeba de-en)")
    parser.add_argument("--out", type=Path, default=Path("runs/analysis"))
    parser.add_argument("--schemes", nargs="+", choices=SCHEME_NAMES, help="fig5: post-ln deepnorm; "
                        "fig3-4: post-ln post-ln-init deepnorm")
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 18, 50, 100], help="fig5: layers per side")
    parser.add_argument("--layers", type=int, default=18, help="fig3-4: layers per side")
    parser.add_argument("--updates", type=int, default=25, help="training updates per model")
    parser.add_argument("--every", type=int, default=5, help="fig3-4: measure every N updates")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    require_positive(parser, args, ("updates", "every", "layers", "max_tokens", "warmup", "threads", "depths"))

    import torch

    import deepnet_fairseq
    from deepnet_fairseq.analysis.data import data_or_bundled
    from deepnet_fairseq.analysis.figures import gradients_and_ln_inputs, model_update_vs_depth
    from deepnet_fairseq.analysis.toy_training import ToySetup

    deepnet_fairseq.register()
    torch.set_num_threads(args.threads)
    data = data_or_bundled(parser, args.data, args.out)
    if not (data / "dict.en.txt").exists() and not any(data.glob("dict.*.txt")):
        parser.error(f"--data {data}: no fairseq dictionary (dict.*.txt) found")
    setup = ToySetup(lr=args.lr, warmup=args.warmup, max_tokens=args.max_tokens)
    started = time.time()
    if args.figure in ("fig5", "all"):
        model_update_vs_depth(data, args.out, args.depths, args.schemes or ["post-ln", "deepnorm"], args.updates, setup)
        print(f"wrote {args.out / 'fig5_model_update.csv'} and .png")
    if args.figure in ("fig3-4", "all"):
        schemes = args.schemes or ["post-ln", "post-ln-init", "deepnorm"]
        gradients_and_ln_inputs(data, args.out, args.layers, schemes, args.updates, setup, args.every)
        print(f"wrote {args.out / 'fig3_4_gradients_ln.csv'} and .png")
    print(f"done in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
