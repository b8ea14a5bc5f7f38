"""Training-time stability instruments (``--log-stability --stability-interval K``).

Every K updates (and at update 1) the training forward pass records, per sub-layer of every layer:

* ``ln``: the LayerNorm input norm ``||x|| / sqrt(d)`` (root mean square per token, averaged over
  tokens) of the sub-layer's LayerNorm, which the DeepNet paper (Figs. 3-4) shows exploding for
  deep Post-LN;
* ``ratio``: the residual-branch ratio ``||G(x)|| / ||x||`` (per token, averaged), G(x) the branch
  and x the residual it is added to;
* ``gnorm``: the L2 norm of the gradient of the sub-layer's parameters (attention or FFN weights),
  measured in the backward pass of the same update (one-shot hooks, removed once they fire);

and, on a fixed probe batch (the first training batch), the model update
``||F(x; theta_t) - F(x; theta_0)||`` (paper Fig. 5): F the decoder's output features, the norm
per token averaged over the batch's tokens, computed by one extra no-grad forward in eval mode.

Values go to fairseq's metrics (``stab_<side><layer>_<sub-layer>_<quantity>`` plus ``stab_update``
and the summaries ``stab_ln_max``, ``stab_ratio_max``), so they appear in the
progress bar, ``--log-format json`` and ``--tensorboard-logdir``.  With the flag off nothing is
registered: no hooks, no extra forward.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

SUBLAYER_NORMS = {
    "self_attn": "self_attn_layer_norm",
    "encoder_attn": "encoder_attn_layer_norm",
    "ffn": "final_layer_norm",
}
SUBLAYER_PARAMS = {"self_attn": ("self_attn",), "encoder_attn": ("encoder_attn",), "ffn": ("fc1", "fc2")}


def rms_norm_per_token(x: Tensor) -> float:
    """Mean over (non-padding) tokens of ``||x_token|| / sqrt(d)``.

    fairseq zeroes padded positions, so all-zero token vectors are left out.
    """
    rms = x.detach().float().pow(2).mean(-1).sqrt()
    real = rms > 0
    return rms[real].mean().item() if real.any() else 0.0


def branch_ratio(branch: Tensor, residual: Tensor) -> float:
    """Mean over (non-padding) tokens of ``||G(x)_token|| / ||x_token||``."""
    b, r = branch.detach().float().norm(dim=-1), residual.detach().float().norm(dim=-1)
    real = r > 0
    return (b[real] / r[real]).mean().item() if real.any() else 0.0


def named_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``[("enc01", layer), ..., ("dec01", layer), ...]`` for a deepnet model."""
    found = []
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "layers"):
        found += [(f"enc{i:02d}", layer) for i, layer in enumerate(encoder.layers, start=1)]
    found += [(f"dec{i:02d}", layer) for i, layer in enumerate(model.decoder.layers, start=1)]
    return found


def sublayer_parameters(layer: nn.Module, sublayer: str) -> List[nn.Parameter]:
    return [p for name in SUBLAYER_PARAMS[sublayer] for p in layer.get_submodule(name).parameters() if p.requires_grad]


def decoder_features(model: nn.Module, net_input: Dict[str, Tensor]) -> Tensor:
    """The decoder's output features (before the output projection) for ``net_input``."""
    if hasattr(model, "encoder"):
        encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        features, _ = model.decoder.extract_features(net_input["prev_output_tokens"], encoder_out=encoder_out)
    else:
        features, _ = model.decoder.extract_features(net_input["src_tokens"])
    return features


def model_update_norm(current: Tensor, reference: Tensor) -> float:
    """``||F(x; theta_t) - F(x; theta_0)||`` per token, averaged over tokens."""
    return (current.float() - reference.float()).norm(dim=-1).mean().item()


class StabilityMonitor:
    """Collects the instruments on measurement steps; see the module docstring."""

    def __init__(self, model: nn.Module, interval: int):
        if interval < 1:
            raise ValueError(f"--stability-interval must be >= 1, got {interval}")
        self.interval = interval
        self.layers = named_layers(model)
        self.measuring = False
        self.values: Dict[str, float] = {}
        self.probe: Optional[Dict[str, Tensor]] = None
        self.reference: Optional[Tensor] = None
        self.grad_hooks: Dict[str, RemovableHandle] = {}
        for name, layer in self.layers:
            layer.stability_observer = self
            layer.stability_name = name
            for sublayer in layer.sublayers:
                norm = getattr(layer, SUBLAYER_NORMS[sublayer])
                norm.register_forward_pre_hook(self._ln_hook(f"{name}_{sublayer}_ln"))

    def is_measurement_step(self, num_updates: int) -> bool:
        return num_updates % self.interval == 0

    def _ln_hook(self, key: str):
        def hook(module, args):
            if self.measuring:
                self.values[key] = rms_norm_per_token(args[0])

        return hook

    def observe_residual(self, layer: nn.Module, sublayer: str, branch: Tensor, residual: Tensor) -> None:
        """Called by the layer's ``residual_connection`` (only while this monitor is attached)."""
        if self.measuring:
            self.values[f"{layer.stability_name}_{sublayer}_ratio"] = branch_ratio(branch, residual)

    def begin(self, model: nn.Module, net_input: Dict[str, Tensor]) -> None:
        """Start a measurement on this training forward; gradient norms are taken in its backward."""
        if self.probe is None:
            self.probe = {k: v.detach().clone() for k, v in net_input.items() if torch.is_tensor(v)}
        self.values = {}
        self.measuring = True
        self.remove_grad_hooks()  # left over if the last measured forward had no backward
        for name, layer in self.layers:
            for sublayer in layer.sublayers:
                params = sublayer_parameters(layer, sublayer)
                if params:
                    key = f"{name}_{sublayer}_gnorm"
                    self.grad_hooks[key] = torch.autograd.graph.register_multi_grad_hook(
                        params, self._grad_hook(key), mode="all"
                    )

    def _grad_hook(self, key: str):
        """A one-shot hook: logs the sub-layer's gradient norm, then removes itself, so only the
        backward of the measured forward is measured."""

        def hook(grads):
            self.grad_hooks.pop(key).remove()
            total = sum(g.detach().float().pow(2).sum().item() for g in grads if g is not None)
            _log(key, math.sqrt(total))

        return hook

    def remove_grad_hooks(self) -> None:
        """Remove the gradient hooks that have not fired yet."""
        for handle in self.grad_hooks.values():
            handle.remove()
        self.grad_hooks.clear()

    def end(self, model: nn.Module) -> Dict[str, float]:
        """Finish the forward-side measurement, run the probe, log and return the values."""
        self.measuring = False
        was_training = model.training
        model.eval()
        with torch.no_grad():
            features = decoder_features(model, self.probe)
        model.train(was_training)
        if self.reference is None:
            self.reference = features.detach().clone()
        values = dict(self.values)
        values["update"] = model_update_norm(features, self.reference)
        for key, value in values.items():
            _log(key, value)
        lns = [v for k, v in values.items() if k.endswith("_ln")]
        ratios = [v for k, v in values.items() if k.endswith("_ratio")]
        if lns:
            _log("ln_max", max(lns))
        if ratios:
            _log("ratio_max", max(ratios))
        return values


def _log(key: str, value: float) -> None:
    from fairseq.logging import metrics

    metrics.log_scalar(f"stab_{key}", value, weight=0, round=4)
