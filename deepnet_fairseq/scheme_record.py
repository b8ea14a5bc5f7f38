"""Which residual scheme a checkpoint was trained with, checked whenever its weights are loaded.

DeepNorm adds no parameters: a DeepNorm checkpoint loads into a Post-LN model (and the reverse)
without any missing or unexpected key, yet the network computes something else (``alpha`` scales
every skip connection).  The same holds for ``--deepnorm-alpha``, Admin's closed-form omega, DLCL's
window, NormFormer's head-scale position, and for LayerDrop pruning (``--*-layers-to-keep``), whose
kept layers must keep the constants they were trained with.

The *record* of a model is ``{side: {"scheme", "network", **settings, "init": {...}}}`` for its
encoder and/or decoder (:meth:`deepnet_fairseq.schemes.base.ResidualScheme.record`).  Two records
describe the same network when every side has the same ``network`` and the same settings that change
what the network computes (DeepNorm's alpha, ...); the scheme's name and its init-only constants
(DeepNorm's beta and init variant, DS-Init, Post-LN-init, ...) are shown, not compared: they decide
the initial weights, which a checkpoint replaces.  A checkpoint's record is computed from the model
configuration it stores (``cfg.model``/``args``: arch, ``--residual-scheme`` and its options, the
trained depths), as stored, before any ``--model-overrides``; so checkpoints need no new field and
stock fairseq checkpoints have a record too: fairseq's own ``transformer``/``transformer_lm`` are
``post-ln`` or, with ``--*-normalize-before``, ``pre-ln`` (``roberta``: its encoder side only).

When fairseq loads a checkpoint (``checkpoint_utils.load_checkpoint_to_cpu``: resume,
``--restore-file``, ``--finetune-from-model``, ``fairseq-generate``/``-interactive``/``-validate``,
the hub) the record is attached to ``state["model"]`` as the attribute :data:`RECORD_ATTRIBUTE`
(the state dict's keys and values stay the weights); every fairseq model checks it in
``load_state_dict`` against its own record (fairseq's own models: from the configuration they are
loaded under) and refuses a mismatch with :class:`SchemeMismatchError`, naming both.  This load's
``--allow-residual-scheme-change`` (the command line, or ``--model-overrides``; never the value a
checkpoint stored) loads anyway, with a warning.
"""

from __future__ import annotations

import argparse
import collections
import logging
import math
from typing import Dict, Mapping, Optional

from torch import nn

from deepnet_fairseq.schemes import DeepNetConfigError

logger = logging.getLogger(__name__)

Record = Dict[str, Dict[str, object]]

RECORD_ATTRIBUTE = "residual_scheme_record"
RECORD_STATE_KEY = "deepnet_residual_scheme_record"
NATIVE_NETWORKS = ("post-ln", "pre-ln")
SHOWN_ONLY = ("scheme", "init", "stock")
ALLOW_FLAG = "--allow-residual-scheme-change"


class SchemeMismatchError(DeepNetConfigError):
    """A checkpoint trained with one residual scheme (or constants) loaded into a model with another."""


def _as_namespace(model_cfg) -> argparse.Namespace:
    from omegaconf import OmegaConf

    if model_cfg is None:
        return argparse.Namespace()

    if OmegaConf.is_config(model_cfg):
        # unresolved: only a few plain fields are read, and an interpolation elsewhere must not fail a load
        return argparse.Namespace(**OmegaConf.to_container(model_cfg, resolve=False))
    if isinstance(model_cfg, Mapping):  # dataclass models' cfg.model as fairseq saves it
        return argparse.Namespace(**model_cfg)
    return argparse.Namespace(**vars(model_cfg))


def architecture(model_cfg) -> str:
    """``--arch`` (or the dataclass model's name) of a stored model configuration."""
    args = _as_namespace(model_cfg)
    return str(getattr(args, "arch", None) or getattr(args, "_name", None) or "unknown")


def _is_deepnet_model(args: argparse.Namespace) -> bool:
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY

    from deepnet_fairseq.models.training import DeepNetModelMixin

    name = architecture(args)
    cls = ARCH_MODEL_REGISTRY.get(name) or MODEL_REGISTRY.get(name)
    return isinstance(cls, type) and issubclass(cls, DeepNetModelMixin)


def record_from_model_config(model_cfg) -> Optional[Record]:
    """The record of the model a stored configuration (``cfg.model`` or ``args``) builds.

    Depths are the trained ones (``--encoder-layers``/``--decoder-layers``, not the pruned count of
    ``--*-layers-to-keep``).  ``None`` when the configuration has no layer counts (not a Transformer).
    """
    if model_cfg is None:
        return None
    args = _as_namespace(model_cfg)
    sides = [side for side in ("encoder", "decoder") if isinstance(getattr(args, f"{side}_layers", None), int)]
    if not sides:
        return None
    if not _is_deepnet_model(args):
        record = {}
        for side in sides:
            network = "pre-ln" if getattr(args, f"{side}_normalize_before", False) else "post-ln"
            record[side] = {"scheme": network, "network": network, "init": {}, "stock": True}
        return record
    from deepnet_fairseq.models.options import fill_option_defaults
    from deepnet_fairseq.models.plan import plan_model

    fill_option_defaults(args)
    return plan_model(args, sides).record()


def _format(items) -> str:
    return ", ".join(f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}" for key, value in items)


def describe(record: Mapping[str, Mapping[str, object]]) -> str:
    """``"encoder deepnorm(alpha=1.4179; init beta=0.497, init=paper), decoder ..."``."""
    parts = []
    for side, entry in record.items():
        network = [(k, v) for k, v in entry.items() if k not in (*SHOWN_ONLY, "network")]
        init = list(entry.get("init", {}).items())
        inside = "; ".join(text for text in (_format(network), "init " + _format(init) if init else "") if text)
        name = entry["scheme"]
        if name != entry["network"]:
            name += f" (a {entry['network']} network)"
        parts.append(f"{side} {name}" + (f"({inside})" if inside else ""))
    return ", ".join(parts)


def _network(entry: Mapping[str, object]) -> Dict[str, object]:
    return {k: v for k, v in entry.items() if k not in SHOWN_ONLY}


def _same_value(a: object, b: object) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return a == b


def records_match(a: Mapping, b: Mapping) -> bool:
    """Same sides, and on each the same network and network settings (floats to a relative 1e-6)."""
    if set(a) != set(b):
        return False
    for side in a:
        x, y = _network(a[side]), _network(b[side])
        if set(x) != set(y) or not all(_same_value(x[k], y[k]) for k in x):
            return False
    return True


def check_loaded_record(model: nn.Module, record: Optional[Mapping], model_cfg: object) -> None:
    """Refuse loading a checkpoint with ``record`` into ``model`` when they compute different networks.

    ``model`` is any fairseq model.  This plugin's models carry ``residual_scheme_record``.  fairseq's
    own models compute ``post-ln``/``pre-ln`` networks, read from their built layers
    (``normalize_before``): they refuse other schemes, and a checkpoint of this plugin's models whose
    LayerNorm placement differs (a stock checkpoint's stored configuration may lack the defaults its
    architecture fills in, so stock-to-stock loads are left to fairseq).  ``model_cfg`` (the
    configuration the model is loaded under) may set ``allow_residual_scheme_change``.
    Raises :class:`SchemeMismatchError`.
    """
    if not record:
        return
    own = model.__dict__.get("residual_scheme_record")
    allowed = bool(_option(model_cfg, "allow_residual_scheme_change"))
    if own is None:
        foreign = {side: entry for side, entry in record.items() if entry.get("network") not in NATIVE_NETWORKS}
        if foreign:
            raise SchemeMismatchError(
                f"the checkpoint was trained with {describe(record)}, which fairseq's own {type(model).__name__} "
                "cannot compute: load it with --user-dir deepnet_fairseq into the deepnet architecture it was "
                "trained with (same --residual-scheme/--deepnorm flags)"
            )
        built = _layer_norm_placement(model)
        differ = [side for side, entry in record.items()
                  if not entry.get("stock") and side in built and built[side] != entry["network"]]
        if not differ or allowed:
            return
        raise SchemeMismatchError(
            f"the checkpoint was trained with {describe(record)}, but this {type(model).__name__} is built with "
            + ", ".join(f"{side} {built[side]}" for side in differ)
            + " (--*-normalize-before): the same weights would compute a different network"
        )
    if records_match(own, record):
        return
    message = (
        f"the checkpoint was trained with {describe(record)}, but this model is built with {describe(own)}: "
        "the same weights would compute a different network. Use the checkpoint's settings, or pass "
        f"{ALLOW_FLAG} if you mean to change them"
    )
    if allowed:
        logger.warning("%s (allowed by %s)", message, ALLOW_FLAG)
        return
    raise SchemeMismatchError(message)


def _layer_norm_placement(model) -> Dict[str, str]:
    """``{side: "pre-ln" | "post-ln"}`` of a fairseq Transformer's built layers (sides it has)."""
    placement = {}
    for side in ("encoder", "decoder"):
        stack = getattr(model, side, None)
        stack = getattr(stack, "sentence_encoder", stack)  # RoBERTa
        layers = getattr(stack, "layers", None)
        if layers is not None and len(layers) and hasattr(layers[0], "normalize_before"):
            placement[side] = "pre-ln" if layers[0].normalize_before else "post-ln"
    return placement


def _option(cfg, name: str):
    if cfg is None:
        return None
    try:
        return getattr(cfg, name, None)
    except Exception:  # OmegaConf struct configs raise on unknown keys
        return None


def stored_model_config(state: Mapping) -> object:
    """The model configuration a checkpoint stores: ``cfg.model`` (or ``args`` of old checkpoints)."""
    cfg = state.get("cfg")
    return cfg.get("model") if cfg is not None else state.get("args")


def attach_record(state: dict, record: Optional[Record], arg_overrides: Optional[Mapping]) -> None:
    """Attach a loaded checkpoint's ``record`` to ``state["model"]`` (as :data:`RECORD_ATTRIBUTE`, and to
    ``state`` as :data:`RECORD_STATE_KEY`, which survives fairseq's broadcast of the state to every
    rank), and drop the ``allow_residual_scheme_change`` the checkpoint stored unless this load's
    ``arg_overrides`` set it: a stored permission allowed one earlier load, not every later one."""
    weights = state.get("model")
    if record is None or not isinstance(weights, Mapping):
        return
    if not isinstance(weights, collections.OrderedDict):  # a plain dict cannot carry an attribute
        weights = state["model"] = collections.OrderedDict(weights)
    setattr(weights, RECORD_ATTRIBUTE, record)
    state[RECORD_STATE_KEY] = record
    if "allow_residual_scheme_change" in (arg_overrides or {}):
        return
    for config in (state.get("args"), stored_model_config(state)):
        if config is not None and _option(config, "allow_residual_scheme_change"):
            _set_option(config, "allow_residual_scheme_change", False)


def _set_option(config, name: str, value) -> None:
    """Set an option that ``config`` (a Namespace, an OmegaConf config or a dict) already has."""
    if isinstance(config, argparse.Namespace):
        setattr(config, name, value)
    else:
        config[name] = value


def install_record_check() -> None:
    """Make every fairseq model check a state dict's :data:`RECORD_ATTRIBUTE` in ``load_state_dict``
    (idempotent)."""
    from fairseq.models.fairseq_model import BaseFairseqModel

    if getattr(BaseFairseqModel.load_state_dict, "_deepnet_record_check", False):
        return
    fairseq_load_state_dict = BaseFairseqModel.load_state_dict

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        config = model_cfg if model_cfg is not None else args
        check_loaded_record(self, getattr(state_dict, RECORD_ATTRIBUTE, None), config)
        return fairseq_load_state_dict(self, state_dict, strict=strict, model_cfg=model_cfg, args=args)

    load_state_dict._deepnet_record_check = True
    BaseFairseqModel.load_state_dict = load_state_dict
