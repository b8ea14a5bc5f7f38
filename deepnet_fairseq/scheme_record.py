"""Which residual scheme a checkpoint was trained with, checked whenever its weights are loaded.

DeepNorm adds no parameters: a DeepNorm checkpoint loads into a Post-LN model (and the reverse)
without any missing or unexpected key, yet the network computes something else (``alpha`` scales
every skip connection).  The same holds for ``--deepnorm-alpha``, Admin's closed-form omega, DLCL's
window, NormFormer's head-scale position, and for LayerDrop pruning (``--*-layers-to-keep``), whose
kept layers must keep the constants they were trained with.

The *record* of a model is ``{side: {"scheme": name, **settings}}`` for its encoder and/or decoder
(:meth:`deepnet_fairseq.schemes.base.ResidualScheme.record`).  A checkpoint's record is computed from
the model configuration it stores (``cfg.model``/``args``: arch, ``--residual-scheme`` and its
options, the true depths), so checkpoints need no new field and stock fairseq checkpoints have one
too: fairseq's own ``transformer``/``transformer_lm`` are ``post-ln`` or, with
``--*-normalize-before``, ``pre-ln``.

When fairseq loads a checkpoint (``checkpoint_utils.load_checkpoint_to_cpu``: resume,
``--restore-file``, ``--finetune-from-model``, ``fairseq-generate``/``-interactive``/``-validate``,
the hub) the record is put into ``state["model"]`` under :data:`RECORD_KEY`; fairseq models take it
out in ``load_state_dict`` and refuse a mismatch with :class:`SchemeMismatchError`, naming both
settings.  ``--allow-residual-scheme-change`` loads anyway (with a warning).  fairseq's own models
accept only ``post-ln``/``pre-ln`` checkpoints (the networks they compute).
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Dict, Mapping, Optional, Tuple

from deepnet_fairseq.schemes import DeepNetConfigError

logger = logging.getLogger(__name__)

Record = Dict[str, Dict[str, object]]

RECORD_KEY = "residual_scheme_record"
NATIVE_SCHEMES = ("post-ln", "pre-ln")
ALLOW_FLAG = "--allow-residual-scheme-change"
# options that say nothing about the network a checkpoint computes
NOT_RECORDED_OPTIONS = ("log_stability", "stability_interval", "stop_on_divergence_patience",
                        "allow_residual_scheme_change")


class SchemeMismatchError(DeepNetConfigError):
    """A checkpoint trained with one residual scheme (or constants) loaded into a model with another."""


def recorded_options() -> Tuple[str, ...]:
    """Names of the plugin options that change a model's record (``--model-overrides`` keys)."""
    from deepnet_fairseq.models.options import OPTION_DEFAULTS

    return tuple(name for name in OPTION_DEFAULTS if name not in NOT_RECORDED_OPTIONS)


def _as_namespace(model_cfg) -> argparse.Namespace:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(model_cfg):
        return argparse.Namespace(**OmegaConf.to_container(model_cfg, resolve=True))
    return argparse.Namespace(**vars(model_cfg))


def _is_deepnet_model(args: argparse.Namespace) -> bool:
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY

    from deepnet_fairseq.models.training import DeepNetModelMixin

    name = getattr(args, "arch", None) or getattr(args, "_name", None)
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
        return {side: {"scheme": "pre-ln" if getattr(args, f"{side}_normalize_before", False) else "post-ln"}
                for side in sides}
    from deepnet_fairseq.models.options import build_schemes, fill_option_defaults

    fill_option_defaults(args)
    encoder_layers = args.encoder_layers if "encoder" in sides else 0
    encoder, decoder = build_schemes(args, encoder_layers, args.decoder_layers)
    return model_record(encoder, decoder)


def model_record(encoder, decoder) -> Record:
    """The record of a model built with these schemes (``encoder`` is ``None`` for a decoder-only model)."""
    record = {} if encoder is None else {"encoder": encoder.record()}
    record["decoder"] = decoder.record()
    return record


def describe(record: Mapping[str, Mapping[str, object]]) -> str:
    """``"encoder deepnorm(alpha=1.4179, beta=0.4970, init=paper), decoder ..."``."""
    parts = []
    for side, entry in record.items():
        settings = ", ".join(
            f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in entry.items() if key != "scheme"
        )
        parts.append(f"{side} {entry['scheme']}" + (f"({settings})" if settings else ""))
    return ", ".join(parts)


def _same_value(a: object, b: object) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return a == b


def records_match(a: Mapping, b: Mapping) -> bool:
    """Same sides, same scheme and settings on each (floats to a relative 1e-6)."""
    if set(a) != set(b):
        return False
    for side in a:
        if set(a[side]) != set(b[side]) or not all(_same_value(a[side][k], b[side][k]) for k in a[side]):
            return False
    return True


def check_loaded_record(model, record: Optional[Mapping], model_cfg) -> None:
    """Refuse loading a checkpoint with ``record`` into ``model`` when they compute different networks.

    ``model`` is any fairseq model: this plugin's models carry ``residual_scheme_record``; fairseq's own
    compute ``post-ln``/``pre-ln`` only.  ``model_cfg`` (the configuration the model is loaded under)
    may set ``allow_residual_scheme_change``.  Raises :class:`SchemeMismatchError`.
    """
    if not record:
        return
    own = model.__dict__.get("residual_scheme_record")
    if own is None:
        foreign = {side: entry for side, entry in record.items() if entry.get("scheme") not in NATIVE_SCHEMES}
        if foreign:
            raise SchemeMismatchError(
                f"the checkpoint was trained with {describe(record)}, which fairseq's own {type(model).__name__} "
                "cannot compute: load it with --user-dir deepnet_fairseq into the deepnet architecture it was "
                "trained with (same --residual-scheme/--deepnorm flags)"
            )
        return
    if records_match(own, record):
        return
    message = (
        f"the checkpoint was trained with {describe(record)}, but this model is built with {describe(own)}: "
        "the same weights would compute a different network. Use the checkpoint's settings, or pass "
        f"{ALLOW_FLAG} if you mean to change them"
    )
    if _option(model_cfg, "allow_residual_scheme_change"):
        logger.warning("%s (allowed by %s)", message, ALLOW_FLAG)
        return
    raise SchemeMismatchError(message)


def _option(cfg, name: str):
    if cfg is None:
        return None
    try:
        return getattr(cfg, name, None)
    except Exception:  # OmegaConf struct configs raise on unknown keys
        return None


def stamp_record(state: dict, scheme_overrides: Optional[Dict[str, object]] = None) -> None:
    """Put the record of a loaded checkpoint ``state`` into ``state["model"][RECORD_KEY]``, then apply
    ``scheme_overrides`` (``--model-overrides`` of recorded options) to its configuration, so that a
    model built from the overridden configuration is compared with what the checkpoint was trained with.
    """
    cfg = state.get("cfg")
    model_cfg = cfg.get("model") if cfg is not None else state.get("args")
    record = record_from_model_config(model_cfg)
    if record is not None and isinstance(state.get("model"), dict):
        state["model"][RECORD_KEY] = record
    if scheme_overrides:
        from fairseq.dataclass.utils import overwrite_args_by_name

        if cfg is not None:
            overwrite_args_by_name(cfg, scheme_overrides)
        if state.get("args") is not None:
            for name, value in scheme_overrides.items():
                setattr(state["args"], name, value)


def split_overrides(arg_overrides: Optional[Dict[str, object]]) -> Tuple[Optional[dict], Dict[str, object]]:
    """``(other overrides, overrides of recorded options)`` of fairseq's ``arg_overrides``."""
    if not arg_overrides:
        return arg_overrides, {}
    recorded = set(recorded_options())
    scheme = {k: v for k, v in arg_overrides.items() if k in recorded}
    return {k: v for k, v in arg_overrides.items() if k not in recorded}, scheme


def install_record_check() -> None:
    """Make every fairseq model check :data:`RECORD_KEY` in ``load_state_dict`` (idempotent)."""
    from fairseq.models.fairseq_model import BaseFairseqModel

    if getattr(BaseFairseqModel.load_state_dict, "_deepnet_record_check", False):
        return
    fairseq_load_state_dict = BaseFairseqModel.load_state_dict

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        if RECORD_KEY in state_dict:
            check_loaded_record(self, state_dict[RECORD_KEY], model_cfg)
            state_dict = _without_record(state_dict)
        return fairseq_load_state_dict(self, state_dict, strict=strict, model_cfg=model_cfg, args=args)

    load_state_dict._deepnet_record_check = True
    BaseFairseqModel.load_state_dict = load_state_dict


def _without_record(state_dict) -> dict:
    """A shallow copy of ``state_dict`` without the record (torch's ``_metadata`` kept)."""
    import collections

    copy = collections.OrderedDict((k, v) for k, v in state_dict.items() if k != RECORD_KEY)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        copy._metadata = metadata
    return copy
