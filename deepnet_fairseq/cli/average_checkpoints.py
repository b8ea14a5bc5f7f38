"""``deepnet-average-checkpoints``: average fairseq checkpoints through the safe loader.

Examples::

    deepnet-average-checkpoints --inputs ckpt/checkpoint9.pt ckpt/checkpoint10.pt --output avg.pt
    deepnet-average-checkpoints --inputs ckpt/ --num-epoch-checkpoints 10 --output avg.pt
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from deepnet_fairseq.checkpoints import average_checkpoints

EPOCH_PATTERN = re.compile(r"^checkpoint(\d+)\.pt$")
UPDATE_PATTERN = re.compile(r"^checkpoint_\d+_(\d+)\.pt$")


def last_checkpoints(directory: Path, count: int, by_update: bool, upper_bound: Optional[int]) -> List[Path]:
    """The ``count`` newest epoch (``checkpointE.pt``) or update (``checkpoint_E_U.pt``) checkpoints."""
    pattern = UPDATE_PATTERN if by_update else EPOCH_PATTERN
    found = []
    for path in directory.iterdir():
        match = pattern.match(path.name)
        if match and (upper_bound is None or int(match.group(1)) <= upper_bound):
            found.append((int(match.group(1)), path))
    found.sort()
    kind = "update" if by_update else "epoch"
    if len(found) < count:
        raise SystemExit(f"--inputs {directory}: wanted {count} {kind} checkpoints, found {len(found)}")
    return [path for _, path in found[-count:]]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", required=True, help="checkpoint files, or one directory")
    parser.add_argument("--output", required=True, help="where to write the averaged checkpoint")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--num-epoch-checkpoints", type=int, help="average the last N checkpointE.pt in the directory")
    group.add_argument("--num-update-checkpoints", type=int, help="average the last N checkpoint_E_U.pt")
    parser.add_argument("--checkpoint-upper-bound", type=int, help="ignore checkpoints after this epoch/update")
    args = parser.parse_args(argv)

    count = args.num_epoch_checkpoints or args.num_update_checkpoints
    if count is not None:
        if len(args.inputs) != 1 or not Path(args.inputs[0]).is_dir():
            parser.error("--num-epoch-checkpoints/--num-update-checkpoints need --inputs to be one directory")
        if count < 1:
            parser.error("--num-epoch-checkpoints/--num-update-checkpoints must be >= 1")
        inputs = last_checkpoints(
            Path(args.inputs[0]), count, args.num_update_checkpoints is not None, args.checkpoint_upper_bound
        )
    else:
        inputs = [Path(p) for p in args.inputs]
        for path in inputs:
            if not path.is_file():
                parser.error(f"--inputs {path}: no such checkpoint file")
    print("averaging:", *inputs, sep="\n  ")
    try:
        average_checkpoints(inputs, args.output)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
