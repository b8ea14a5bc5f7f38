"""What a deepnet model does around its training forward pass: Admin's one-time profiling and the
``--log-stability`` instruments.  Both are inactive (no extra work) unless their scheme/flag is used."""

from typing import Callable, Dict

from torch import Tensor, nn

from deepnet_fairseq.analysis.instruments import StabilityMonitor
from deepnet_fairseq.models.checks import check_vocabulary_matches
from deepnet_fairseq.schemes.admin import needs_admin_profiling, profile_admin


def attach_instruments(model: nn.Module, args) -> None:
    """Attach a :class:`StabilityMonitor` when ``--log-stability`` is set."""
    if getattr(args, "log_stability", False):
        interval = getattr(args, "stability_interval", None) or 50
        model.__dict__["stability_monitor"] = StabilityMonitor(model, int(interval))


def training_forward(model: nn.Module, net_input: Dict[str, Tensor], run: Callable[[], object]):
    """Run ``run()`` (the model's forward) with profiling/instruments when they apply."""
    if not model.training:
        return run()
    if needs_admin_profiling(model):
        profile_admin(model, run)
    monitor = model.__dict__.get("stability_monitor")
    if monitor is None:
        return run()
    if not monitor.is_measurement_step(model.__dict__.get("num_updates_seen", 0)):
        monitor.remove_grad_hooks()  # a measured forward without backward must not measure this update
        return run()
    monitor.begin(model, net_input)
    try:
        output = run()
    except BaseException:
        monitor.cancel()
        raise
    monitor.end(model)
    return output


class DeepNetModelMixin:
    """What both deepnet models add to their fairseq base class: the dictionary check on load, and
    the update count the instruments read."""

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        check_vocabulary_matches(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def set_num_updates(self, num_updates):
        self.__dict__["num_updates_seen"] = num_updates
        super().set_num_updates(num_updates)
