"""Training-time stability instruments (``--log-stability --stability-interval K``), and how runtime code
(these instruments, the divergence report) finds the scheme-driven stacks of a model and their schemes
(:func:`model_stacks`).

Every K updates (and at update 1) the training forward pass records, per sub-layer of every layer of
every stack (encoder, decoder; an encoder-only or decoder-only model has one):

* ``ln``: the LayerNorm input norm ``||x|| / sqrt(d)`` (root mean square per token, averaged over
  tokens) of the sub-layer's LayerNorm, which the DeepNet paper (Figs. 3-4) shows exploding for
  deep Post-LN;
* ``ratio``: the residual-branch ratio ``||G(x)|| / ||x||`` (per token, averaged), G(x) the branch
  and x the residual it is added to;
* ``gnorm``: the L2 norm of the gradient of the sub-layer's parameters (attention or FFN weights),
  measured in the backward pass of the same update (one-shot hooks, removed once they fire);

and, on a fixed probe batch (the first measured training batch), the model update
``||F(x; theta_t) - F(x; theta_0)||`` (paper Fig. 5): F the model's output features (the decoder's,
or an encoder-only model's encoder's), the norm per token averaged over the batch's tokens, computed
by one extra no-grad forward in eval mode.

Every average is over real tokens only: the batch's padding masks come from its tokens
(``src_tokens`` for encoder layers, ``prev_output_tokens`` for decoder layers; a decoder-only LM's
``src_tokens`` for its decoder layers) against the stack's padding index.  A padded position is not
zero past the first sub-layer (attention and FFN write into it), so it cannot be recognised from the
activations.  Only training forwards measure, never incremental decoding.

A measurement is a context manager, :meth:`StabilityMonitor.measure`, around one training forward: it
registers the forward-side hooks (LayerNorm forward pre-hooks, the layers' residual hooks) on entry
and removes them on exit, whether the forward raised or not; the gradient hooks it also registers
are one-shot (each removed when it fires; any left over, e.g. after a forward without backward, are
removed before the next forward).  Between measurements no hook of the instruments exists.

Values go to fairseq's metrics (``stab_<side><layer>_<sub-layer>_<quantity>`` plus ``stab_update``
and the summaries ``stab_ln_max``, ``stab_ratio_max``), so they appear in the progress bar,
``--log-format json`` and ``--tensorboard-logdir``.  With the flag off nothing is registered: no
hooks, no extra forward.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

SIDES = ("encoder", "decoder")
SUBLAYER_NORMS = {
    "self_attn": "self_attn_layer_norm",
    "encoder_attn": "encoder_attn_layer_norm",
    "ffn": "final_layer_norm",
}
SUBLAYER_PARAMS = {"self_attn": ("self_attn",), "encoder_attn": ("encoder_attn",), "ffn": ("fc1", "fc2")}


def model_stacks(model: nn.Module) -> Dict[str, nn.Module]:
    """``{side: stack}`` of the scheme-driven layer stacks of a deepnet model, in forward order:
    ``model.encoder``/``model.decoder``, or RoBERTa's ``model.encoder.sentence_encoder``.  Empty for a
    model of another plugin (no stack with a residual scheme)."""
    # imported here: this module is imported while the plugin registers (divergence.py, models/training.py),
    # before the schemes package may be importable
    from deepnet_fairseq.schemes.base import ResidualScheme

    found = {}
    for side in SIDES:
        stack = getattr(model, side, None)
        stack = getattr(stack, "sentence_encoder", stack)  # deepnet_roberta
        if isinstance(getattr(stack, "scheme", None), ResidualScheme):
            found[side] = stack
    return found


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
    """``[("enc01", layer), ..., ("dec01", layer), ...]``: every layer of every stack of a deepnet model."""
    return [
        (f"{side[:3]}{index:02d}", layer)
        for side, stack in model_stacks(model).items()
        for index, layer in enumerate(stack.layers, start=1)
    ]


def sublayer_parameters(layer: nn.Module, sublayer: str) -> List[nn.Parameter]:
    """The trainable parameters of one sub-layer (attention or FFN weights) of ``layer``."""
    return [p for name in SUBLAYER_PARAMS[sublayer] for p in layer.get_submodule(name).parameters() if p.requires_grad]


def padding_index(stack: nn.Module) -> int:
    """The padding index of a stack: its ``padding_idx``, else its dictionary's pad."""
    index = getattr(stack, "padding_idx", None)
    if index is None and getattr(stack, "dictionary", None) is not None:
        index = stack.dictionary.pad()
    if index is None:
        raise ValueError(
            f"--log-stability: {type(stack).__name__} has neither a padding_idx nor a dictionary, so padding "
            "positions cannot be left out of the instruments"
        )
    return int(index)


def real_token_masks(model: nn.Module, net_input: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``{"enc": ..., "dec": ...}`` (the sides the model has): bool B x T masks of the real (non-padding)
    input tokens of each stack; the decoder's are ``prev_output_tokens`` after an encoder, else (a
    decoder-only LM) ``src_tokens``."""
    stacks = model_stacks(model)
    decoder_input = "prev_output_tokens" if "encoder" in stacks else "src_tokens"
    return {
        side[:3]: net_input["src_tokens" if side == "encoder" else decoder_input].ne(padding_index(stack))
        for side, stack in stacks.items()
    }


def output_side(model: nn.Module) -> str:
    """``"dec"`` or ``"enc"``: the side whose output features :func:`output_features` returns."""
    return "dec" if "decoder" in model_stacks(model) else "enc"


def output_features(model: nn.Module, net_input: Dict[str, Tensor]) -> Tensor:
    """The model's output features, B x T x C, before any output projection or head: the decoder's
    (after the encoder for an encoder-decoder), or an encoder-only model's encoder's."""
    stacks = model_stacks(model)
    encoder, decoder = stacks.get("encoder"), stacks.get("decoder")
    encoder_out = None
    if encoder is not None:
        encoder_out = encoder(net_input["src_tokens"], src_lengths=net_input.get("src_lengths"))
    if decoder is None:
        return encoder_out["encoder_out"][0].transpose(0, 1)  # T x B x C -> B x T x C
    tokens = net_input["prev_output_tokens"] if encoder is not None else net_input["src_tokens"]
    features, _ = decoder.extract_features(tokens, encoder_out=encoder_out)
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
        if not self.layers:
            raise ValueError(f"--log-stability: {type(model).__name__} has no scheme-driven layer stack to measure")
        self.values: Dict[str, float] = {}
        self.probe: Optional[Dict[str, Tensor]] = None
        self.probe_real: Optional[Tensor] = None
        self.reference: Optional[Tensor] = None
        self.real: Dict[str, Tensor] = {}  # T x B padding masks of the measured batch, by side (enc, dec)
        self.grad_hooks: Dict[str, RemovableHandle] = {}

    def is_measurement_step(self, num_updates: int) -> bool:
        return num_updates % self.interval == 0

    @contextmanager
    def measure(self, model: nn.Module, net_input: Dict[str, Tensor]) -> Iterator[None]:
        """Measure the training forward run inside the ``with`` block (gradient norms in its backward).

        The forward hooks exist only inside the block; when the block raises (e.g. an out-of-memory
        batch fairseq skips) the gradient hooks go too and nothing is logged.  On a normal exit the
        probe batch is run and every value logged.
        """
        handles = self._start(model, net_input)
        try:
            yield
        except BaseException:
            self.remove_grad_hooks()
            raise
        finally:
            for handle in handles:
                handle.remove()
            self.real = {}
        self._finish(model)

    def _start(self, model: nn.Module, net_input: Dict[str, Tensor]) -> List[RemovableHandle]:
        """Set up one measurement; returns the handles of the forward hooks it registered."""
        self.remove_grad_hooks()  # left over if the last measured forward had no backward
        if self.probe is None:
            self.probe = {k: v.detach().clone() for k, v in net_input.items() if torch.is_tensor(v)}
            self.probe_real = real_token_masks(model, self.probe)[output_side(model)]
        # fairseq's layers work in T x B x C, the tokens are B x T
        self.real = {side: mask.t() for side, mask in real_token_masks(model, net_input).items()}
        self.values = {}
        handles: List[RemovableHandle] = []
        try:
            for name, layer in self.layers:
                handles.append(layer.register_residual_hook(self._residual_hook(name)))
                for sublayer in layer.sublayers:
                    norm = layer.get_submodule(SUBLAYER_NORMS[sublayer])
                    handles.append(norm.register_forward_pre_hook(self._ln_hook(f"{name}_{sublayer}_ln", name[:3])))
                    params = sublayer_parameters(layer, sublayer)
                    if params:
                        key = f"{name}_{sublayer}_gnorm"
                        self.grad_hooks[key] = torch.autograd.graph.register_multi_grad_hook(
                            params, self._grad_hook(key), mode="all"
                        )
        except BaseException:
            for handle in handles:
                handle.remove()
            self.remove_grad_hooks()
            raise
        return handles

    def _ln_hook(self, key: str, side: str):
        """LayerNorm forward pre-hook of a ``side`` (enc/dec) layer: its input is T x B x C."""

        def hook(module, args):
            self.values[key] = rms_norm_per_token(args[0], self.real[side])

        return hook

    def _residual_hook(self, name: str):
        """Residual hook of the layer called ``name`` (``enc01``, ...): the tensors are T x B x C."""

        def hook(layer: nn.Module, sublayer: str, branch: Tensor, residual: Tensor) -> None:
            self.values[f"{name}_{sublayer}_ratio"] = branch_ratio(branch, residual, self.real[name[:3]])

        return hook

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

    def _finish(self, model: nn.Module) -> None:
        """Run the probe, log the values of the finished measurement."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                features = output_features(model, self.probe)
        finally:
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


METRIC_PREFIX = "stab_"


def _log(key: str, value: float) -> None:
    from fairseq.logging import metrics

    metrics.log_scalar(f"{METRIC_PREFIX}{key}", value, weight=0, round=4)


def drop_emptied_stability_meters() -> None:
    """Remove the ``stab_*`` meters that hold no value from fairseq's active metric aggregators.

    fairseq keeps a meter once a key was logged and prints every meter at each log interval; after
    the interval's reset a meter that was not logged again prints ``None``.  The instruments log only
    on measurement updates, so without this every log line between measurements would list every
    sub-layer's keys as ``None``, and so would every log line of a run resumed without
    ``--log-stability`` (fairseq restores its metrics from the checkpoint).  Called before each
    training forward: a meter holding a value is kept until it has been printed and reset.
    """
    from fairseq.logging import metrics

    for aggregator in metrics.get_active_aggregators():
        emptied = {key for key, meter in aggregator.items()
                   if key.startswith(METRIC_PREFIX) and getattr(meter, "count", None) == 0
                   and getattr(meter, "val", 0) is None}
        if emptied:
            for key in emptied:
                del aggregator[key]
            # MetersDict orders its keys by this list of (priority, insertion, key)
            aggregator.priorities = [entry for entry in aggregator.priorities if entry[2] not in emptied]
