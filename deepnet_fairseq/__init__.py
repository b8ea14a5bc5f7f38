"""deepnet-fairseq: DeepNet / DeepNorm (Wang et al. 2022, arXiv:2203.00555) as a fairseq plugin.

Loaded by ``fairseq-train --user-dir deepnet_fairseq`` (or ``import deepnet_fairseq``): registers the
models and architectures, and lets ``torch.load(weights_only=True)`` accept fairseq checkpoints
through an explicit allow-list (see :mod:`deepnet_fairseq.checkpoints`).
"""

from deepnet_fairseq.checkpoints import install_checkpoint_allowlist
from deepnet_fairseq.coefficients import DeepNormCoefficients, deepnorm_coefficients

install_checkpoint_allowlist()

from deepnet_fairseq import models  # noqa: E402  (registration needs fairseq imported)

__all__ = ["DeepNormCoefficients", "deepnorm_coefficients", "install_checkpoint_allowlist", "models"]
__version__ = "0.1.0"
