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

Every average is over real tokens only: :meth:`StabilityMonitor.begin` builds the batch's padding
masks from its tokens (``src_tokens`` for encoder layers, ``prev_output_tokens`` for decoder layers;
a decoder-only LM's ``src_tokens`` for its decoder layers) against the model's padding index.  A
padded position is not zero past the first sub-layer (attention and FFN write into it), so it cannot
be recognised from the activations.  Only training forwards measure, never incremental decoding.

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


def _mean_over_real(per_token: Tensor, real: Tensor) -> float:
    """Mean of ``per_token`` over the positions where ``real`` (same shape, bool) is true; 0.0 if none."""
    if per_token.shape != real.shape:
        raise RuntimeError(
            f"--log-stability: activations of {tuple(per_token.shape)} tokens do not match the batch's "
            f"padding mask {tuple(real.shape)}"
        )
    return per_token[real].mean().item() if real.any() else 0.0


def rms_norm_per_token(x: Tensor, real: Tensor) -> float:
    """Mean over real tokens (``real``: bool, ``x``'s shape without the last dimension) of
    ``||x_token|| / sqrt(d)``."""
    return _mean_over_real(x.detach().float().pow(2).mean(-1).sqrt(), real)


def branch_ratio(branch: Tensor, residual: Tensor, real: Tensor) -> float:
    """Mean over real tokens (``real`` as in :func:`rms_norm_per_token`) of ``||G(x)_token|| / ||x_token||``."""
    b, r = branch.detach().float().norm(dim=-1), residual.detach().float().norm(dim=-1)
    return _mean_over_real(b / r, real)


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


def padding_index(module: nn.Module) -> int:
    """The padding index of an encoder or decoder: its ``padding_idx``, else its dictionary's pad."""
    index = getattr(module, "padding_idx", None)
    if index is None and getattr(module, "dictionary", None) is not None:
        index = module.dictionary.pad()
    if index is None:
        raise ValueError(
            f"--log-stability: {type(module).__name__} has neither a padding_idx nor a dictionary, so padding "
            "positions cannot be left out of the instruments"
        )
    return int(index)


def real_token_masks(model: nn.Module, net_input: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``{"enc": ..., "dec": ...}``: bool B x T masks of the real (non-padding) input tokens of each side;
    a decoder-only LM (no ``encoder``) has only ``"dec"``, from its ``src_tokens``."""
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        return {"dec": net_input["src_tokens"].ne(padding_index(model.decoder))}
    return {
        "enc": net_input["src_tokens"].ne(padding_index(encoder)),
        "dec": net_input["prev_output_tokens"].ne(padding_index(model.decoder)),
    }


def decoder_features(model: nn.Module, net_input: Dict[str, Tensor]) -> Tensor:
    """The decoder's output features (before the output projection) for ``net_input``."""
    if hasattr(model, "encoder"):
        encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        features, _ = model.decoder.extract_features(net_input["prev_output_tokens"], encoder_out=encoder_out)
    else:
        features, _ = model.decoder.extract_features(net_input["src_tokens"], encoder_out=None)
    return features


def model_update_norm(current: Tensor, reference: Tensor, real: Tensor) -> float:
    """``||F(x; theta_t) - F(x; theta_0)||`` per token, averaged over the real tokens (``real``: bool B x T,
    the features B x T x C)."""
    return _mean_over_real((current.float() - reference.float()).norm(dim=-1), real)


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
        self.probe_real: Optional[Tensor] = None
        self.reference: Optional[Tensor] = None
        self.real: Dict[str, Tensor] = {}  # T x B padding masks of the measured batch, by side (enc, dec)
        self.grad_hooks: Dict[str, RemovableHandle] = {}
        for name, layer in self.layers:
            layer.stability_observer = self
            layer.stability_name = name
            for sublayer in layer.sublayers:
                norm = getattr(layer, SUBLAYER_NORMS[sublayer])
                norm.register_forward_pre_hook(self._ln_hook(f"{name}_{sublayer}_ln", name[:3]))

    def is_measurement_step(self, num_updates: int) -> bool:
        return num_updates % self.interval == 0

    def _ln_hook(self, key: str, side: str):
        """LayerNorm forward pre-hook of a ``side`` (enc/dec) layer: its input is T x B x C."""

        def hook(module, args):
            if self.measuring:
                self.values[key] = rms_norm_per_token(args[0], self.real[side])

        return hook

    def observe_residual(self, layer: nn.Module, sublayer: str, branch: Tensor, residual: Tensor) -> None:
        """Called by the layer's ``residual_connection`` (only while this monitor is attached); the tensors
        are T x B x C, on the side (enc/dec) that starts the layer's ``stability_name``."""
        if self.measuring:
            real = self.real[layer.stability_name[:3]]
            self.values[f"{layer.stability_name}_{sublayer}_ratio"] = branch_ratio(branch, residual, real)

    def begin(self, model: nn.Module, net_input: Dict[str, Tensor]) -> None:
        """Start a measurement on this training forward; gradient norms are taken in its backward."""
        if self.probe is None:
            self.probe = {k: v.detach().clone() for k, v in net_input.items() if torch.is_tensor(v)}
            self.probe_real = real_token_masks(model, self.probe)["dec"]
        # fairseq's layers work in T x B x C, the tokens are B x T
        self.real = {side: mask.t() for side, mask in real_token_masks(model, net_input).items()}
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

    def cancel(self) -> None:
        """Abandon a measurement whose forward pass failed (e.g. an out-of-memory batch fairseq skips)."""
        self.measuring = False
        self.real = {}
        self.remove_grad_hooks()

    def end(self, model: nn.Module) -> Dict[str, float]:
        """Finish the forward-side measurement, run the probe, log and return the values."""
        self.measuring = False
        self.real = {}
        was_training = model.training
        model.eval()
        with torch.no_grad():
            features = decoder_features(model, self.probe)
        model.train(was_training)
        if self.reference is None:
            self.reference = features.detach().clone()
        values = dict(self.values)
        values["update"] = model_update_norm(features, self.reference, self.probe_real)
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
