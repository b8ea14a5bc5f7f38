"""The bundled Tatoeba German-English data, binarized once for the analyses and the sweep.

The data and its preparation exist only in a checkout of the repository: the preparation is the demo's own
(``scripts/demo.sh`` with ``DEMO_STAGE=data``: split by English sentence, joint SentencePiece,
``fairseq-preprocess --joined-dictionary``), reused while its inputs are unchanged. An installed copy of
the package without the checkout raises :class:`BundledDataUnavailable`, which the commands turn into an
error asking for ``--data DIR``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path
from typing import Optional

CHECKOUT = Path(__file__).resolve().parent.parent.parent  # the repository root, when run from a checkout
DEMO_SCRIPT = Path("scripts") / "demo.sh"
BUNDLED_TSV = Path("data") / "tatoeba-deu-eng" / "deu-eng.tsv.gz"


class BundledDataUnavailable(RuntimeError):
    """The bundled data or its preparation script is not there (the package runs outside a checkout)."""


def ensure_bundled_data(out: Path) -> Path:
    """Return ``out/data/bin`` (fairseq-binarized de->en), preparing it if needed."""
    missing = [str(CHECKOUT / p) for p in (DEMO_SCRIPT, BUNDLED_TSV) if not (CHECKOUT / p).is_file()]
    if missing:
        raise BundledDataUnavailable(
            f"the bundled data exists only in a checkout of the repository (not found: {', '.join(missing)}): "
            "pass --data DIR with fairseq-binarized data (e.g. from fairseq-preprocess)")
    env = dict(os.environ, DEMO_STAGE="data", DEMO_OUT=str(out.resolve()))
    subprocess.run(["bash", str(CHECKOUT / DEMO_SCRIPT)], env=env, check=True)
    return out / "data" / "bin"


def data_or_bundled(parser: argparse.ArgumentParser, data: Optional[Path], out: Path) -> Path:
    """A command's ``--data``, else the bundled data prepared under ``out``; outside a checkout, the
    parser's usage error (exit 2) asking for ``--data DIR``."""
    if data is not None:
        return data
    try:
        return ensure_bundled_data(out)
    except BundledDataUnavailable as err:
        parser.error(str(err))
