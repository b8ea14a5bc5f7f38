"""What a deepnet model does around its training forward pass: the ``--log-stability`` instruments
(inactive, no hooks and no extra forward, unless the flag is set) and dropping their emptied meters.
Schemes that act on the first training forward (Admin's profiling) hook their own stacks
(:meth:`ResidualScheme.prepare_stack`)."""

from typing import Callable, Dict

from torch import Tensor, nn

from deepnet_fairseq.models.checks import check_vocabulary_matches
from deepnet_fairseq.stability import StabilityMonitor, drop_emptied_stability_meters


def attach_instruments(model: nn.Module, args) -> None:
    """Attach a :class:`StabilityMonitor` when ``--log-stability`` is set."""
    if getattr(args, "log_stability", False):
        interval = getattr(args, "stability_interval", None) or 50
        model.__dict__["stability_monitor"] = StabilityMonitor(model, int(interval))


def training_forward(model: nn.Module, net_input: Dict[str, Tensor], run: Callable[[], object]):
    """Run ``run()`` (the model's forward), measured by the instruments on their measurement steps."""
    if not model.training:
        return run()
    drop_emptied_stability_meters()
    monitor = model.__dict__.get("stability_monitor")
    if monitor is None:
        return run()
    if not monitor.is_measurement_step(model.__dict__.get("num_updates_seen", 0)):
        monitor.remove_grad_hooks()  # a measured forward without backward must not measure this update
        return run()
    with monitor.measure(model, net_input):
        return run()


class DeepNetModelMixin:
    """What every deepnet model adds to its fairseq base class: the dictionary check on load, and
    the update count the instruments read."""

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        check_vocabulary_matches(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def set_num_updates(self, num_updates):
        self.__dict__["num_updates_seen"] = num_updates
        super().set_num_updates(num_updates)
