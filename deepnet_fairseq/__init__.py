"""deepnet-fairseq: DeepNet / DeepNorm (Wang et al. 2022, arXiv:2203.00555) as a fairseq plugin.

Loaded by ``fairseq-train --user-dir deepnet_fairseq`` (or ``import deepnet_fairseq``): registers the
models and architectures, lets ``torch.load(weights_only=True)`` accept fairseq checkpoints through an
explicit allow-list, makes checkpoint copies crash-safe (:mod:`deepnet_fairseq.checkpoints`), and
reports divergence of this plugin's models clearly (:mod:`deepnet_fairseq.divergence`), keeps
the last batch that fairseq main drops, and lets the fairseq modules that still use names NumPy
removed run on NumPy 2 (:mod:`deepnet_fairseq.compat`).
"""

from deepnet_fairseq.checkpoints import install_checkpoint_allowlist, install_crash_safe_checkpoint_io
from deepnet_fairseq.coefficients import DeepNormCoefficients, deepnorm_coefficients
from deepnet_fairseq.compat import install_keep_last_batch, install_numpy2_names
from deepnet_fairseq.divergence import install_divergence_guard
from deepnet_fairseq.scheme_record import install_record_check

install_checkpoint_allowlist()
install_crash_safe_checkpoint_io()
install_divergence_guard()
install_keep_last_batch()
install_numpy2_names()
install_record_check()

from deepnet_fairseq import models  # noqa: E402  (registration needs fairseq imported)

__all__ = ["DeepNormCoefficients", "deepnorm_coefficients", "install_checkpoint_allowlist", "models"]
__version__ = "0.1.0"
