"""The bundled Tatoeba German-English data, binarized once for the analyses and the sweep.

The preparation is the demo's own (``scripts/demo.sh`` with ``DEMO_STAGE=data``: split by English
sentence, joint SentencePiece, ``fairseq-preprocess --joined-dictionary``), reused while its inputs
are unchanged.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def ensure_bundled_data(out: Path) -> Path:
    """Return ``out/data/bin`` (fairseq-binarized de->en), preparing it if needed."""
    script = REPO / "scripts" / "demo.sh"
    if not script.exists():
        raise FileNotFoundError(
            f"{script} not found (an installed copy without the repository?): pass --data DIR with a "
            "fairseq-binarized parallel corpus instead"
        )
    env = dict(os.environ, DEMO_STAGE="data", DEMO_OUT=str(out.resolve()))
    subprocess.run(["bash", str(script)], env=env, check=True)
    return out / "data" / "bin"
