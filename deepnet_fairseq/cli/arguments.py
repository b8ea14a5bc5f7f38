"""Argument checks shared by the console scripts."""

import argparse
from typing import Iterable


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str]) -> None:
    """Exit with a usage error naming the flag unless every value (or every list item) is >= 1."""
    for name in names:
        value = getattr(args, name)
        values = value if isinstance(value, list) else [value]
        if any(v < 1 for v in values):
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
