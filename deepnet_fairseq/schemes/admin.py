"""Admin (Liu et al. 2020, "Understanding the Difficulty of Training Transformers"):
``x_i = LN(x_{i-1} * w_i + G_i(x_{i-1}))`` with one vector ``w_i`` (size d) per sub-layer.

``admin`` (profiled, as the paper): ``w_i = sqrt(sum_{j<i} Var[G_j])``, measured on the first
training batch.  The reference code needs a separate profiling run that writes a file; here the
profiling is one extra no-grad forward of each stack on its first training input, in-process (a
forward pre-hook on the stack, removed once the stack is profiled): a running ratio
``r`` starts at 1 for each stack, each sub-layer in order sets ``w_i := r`` and then
``r <- sqrt(Var[x * w_i] + Var[G_i(x)])`` (variances over all elements, after dropout, as the
reference).  Rank 0's ratios are broadcast to every rank; the ratios and a ``admin_profiled`` flag
(a float 0/1: EMA, averaging and fp16 casting treat every state entry as floating-point data) are
parameters/buffers of the model, so a checkpoint carries them and neither resume nor generation
profiles again.

``admin-closed`` (microsoft/admin-torch, no profiling): the same form with
``w = sqrt((n + 1) / ln(n + 1) - 1)``, n the number of residual sub-layers of the stack (2N or 3M);
a constant unless ``--admin-omega-trainable`` makes it a trainable vector.

Both are Post-LN and re-base fc1/fc2 on Xavier-uniform with zero bias (fairseq-0.9 init).
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn

from deepnet_fairseq.schemes.base import ResidualScheme, option, register_scheme
from deepnet_fairseq.schemes.init import xavier_ffn_


def omega_name(sublayer: str) -> str:
    return f"admin_omega_{sublayer}"


@register_scheme
class AdminScheme(ResidualScheme):
    name = "admin"
    layer_norm = "post"

    def __init__(self, context):
        super().__init__(context)
        self.profiling = False
        self.ratio = 1.0

    def prepare_layer(self, layer: nn.Module, index: int) -> None:
        for sublayer in layer.sublayers:
            setattr(layer, omega_name(sublayer), nn.Parameter(torch.ones(layer.embed_dim)))
        # a float 0/1 flag, not a bool: every consumer of a state dict (fairseq's EMA, checkpoint averaging,
        # fp16 casting) treats entries as floating-point tensors
        layer.register_buffer("admin_profiled", torch.zeros(()))

    def initialize_layer(self, layer: nn.Module, index: int) -> None:
        xavier_ffn_(layer)

    def prepare_stack(self, stack: nn.Module) -> None:
        """Profile ``stack`` on its first training forward: a forward pre-hook, removed once the stack is
        profiled (by that forward, or by a loaded checkpoint that already says so)."""
        stack.admin_profiling_hook = stack.register_forward_pre_hook(_profile_unprofiled_stack, with_kwargs=True)

    def profile(self, stack: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        """Measure the ratios of ``stack``'s layers with one no-grad forward of the stack on ``args`` and
        ``kwargs`` (the running ratio restarts at 1.0; the forward visits the sub-layers in order), then
        share rank 0's."""
        self.ratio = 1.0
        self.profiling = True
        try:
            with torch.no_grad():
                stack.forward(*args, **kwargs)  # forward, not __call__: this stack's pre-hook is running
        finally:
            self.profiling = False
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for layer in admin_layers(stack):
                for sublayer in layer.sublayers:
                    torch.distributed.broadcast(getattr(layer, omega_name(sublayer)).data, src=0)

    def combine(self, layer: nn.Module, sublayer: str, branch: Tensor, residual: Tensor) -> Tensor:
        omega = getattr(layer, omega_name(sublayer))
        if self.profiling:
            with torch.no_grad():
                omega.fill_(self.ratio)
                scaled = residual * omega
                self.ratio = math.sqrt(
                    scaled.float().var(unbiased=False).item() + branch.float().var(unbiased=False).item()
                )
                layer.admin_profiled.fill_(1.0)
        return residual * omega + branch


def admin_layers(module: nn.Module) -> List[nn.Module]:
    """Every layer in ``module`` (a stack or a model) that uses the profiled Admin scheme."""
    return [
        m for m in module.modules() if isinstance(getattr(m, "scheme", None), AdminScheme) and hasattr(m, "sublayers")
    ]


def _profile_unprofiled_stack(stack: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
    """Forward pre-hook of an Admin stack (see :meth:`AdminScheme.prepare_stack`): on a training forward,
    profile the stack if one of its layers is unprofiled, then remove this hook.  A module-level function
    that acts on the module it is called for, so a deep copy of the stack (fairseq's EMA) profiles itself."""
    if not stack.training:
        return
    if any(float(layer.admin_profiled) == 0.0 for layer in admin_layers(stack)):
        stack.scheme.profile(stack, args, kwargs)
    stack.admin_profiling_hook.remove()


def admin_closed_omega(num_sublayers: int) -> float:
    """admin-torch's 'O(logn)' closed form ``sqrt((n + 1) / ln(n + 1) - 1)``."""
    n = num_sublayers
    return math.sqrt((n + 1) / math.log(n + 1) - 1)


@dataclass
class AdminClosedOptions:
    """``--residual-scheme admin-closed``."""

    admin_omega_trainable: bool = option(False, help="admin-closed: make omega a trainable vector per sub-layer")


@register_scheme
class AdminClosedScheme(ResidualScheme):
    name = "admin-closed"
    layer_norm = "post"
    Options = AdminClosedOptions

    def __init__(self, context):
        super().__init__(context)
        self.omega = admin_closed_omega(context.layers * context.sublayers_per_layer)
        self.trainable = bool(self.options.admin_omega_trainable)

    def prepare_layer(self, layer: nn.Module, index: int) -> None:
        if self.trainable:
            for sublayer in layer.sublayers:
                setattr(layer, omega_name(sublayer), nn.Parameter(torch.full((layer.embed_dim,), self.omega)))

    def initialize_layer(self, layer: nn.Module, index: int) -> None:
        xavier_ffn_(layer)

    def combine(self, layer: nn.Module, sublayer: str, branch: Tensor, residual: Tensor) -> Tensor:
        if self.trainable:
            return residual * getattr(layer, omega_name(sublayer)) + branch
        return residual * self.omega + branch

    def settings(self) -> dict:
        return {"omega": self.omega, "trainable": self.trainable}

    def describe(self) -> str:
        return f"admin-closed(omega={self.omega:.4f}, trainable={self.trainable})"
