"""The build plan of a deepnet model: everything about its residual scheme, resolved once per build.

``plan_model(args, sides)`` runs at the top of each model's ``build_model`` (and wherever a stored
configuration's record is needed).  It resolves the scheme name (``--deepnorm`` is an alias), the
trained depth of each side (``--encoder-layers``/``--decoder-layers``; ``--*-layers-to-keep`` prunes
layers, the kept ones keep the constants they were trained with), the scheme's options, validates the
flags once, and builds one scheme object per side.  The plan is then handed to the stacks unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from deepnet_fairseq.models.options import flag, resolve_scheme_name, validate_run_options
from deepnet_fairseq.scheme_record import Record
from deepnet_fairseq.schemes import DeepNetConfigError, ResidualScheme, SchemeContext, scheme_class
from deepnet_fairseq.schemes.base import resolve_options

SIDES = ("encoder", "decoder")
# run-level settings a scheme may refuse (ReZero refuses fp16)
RUN_SETTINGS = ("fp16", "memory_efficient_fp16")


@dataclass(frozen=True)
class ModelPlan:
    """The residual scheme of each side of one model build.

    ``trained_layers``: the trained depth of each side the model has (N, M); ``kept_layers``: the
    layers actually built after ``--*-layers-to-keep`` (equal when nothing is pruned).  ``schemes``
    holds one scheme object per side the model has.
    """

    scheme: str
    layer_norm: str
    trained_layers: Dict[str, int]
    kept_layers: Dict[str, int]
    schemes: Dict[str, ResidualScheme]

    @property
    def encoder(self) -> Optional[ResidualScheme]:
        return self.schemes.get("encoder")

    @property
    def decoder(self) -> Optional[ResidualScheme]:
        return self.schemes.get("decoder")

    def record(self) -> Record:
        """``{side: scheme.record()}``: what a checkpoint of this model computes
        (:mod:`deepnet_fairseq.scheme_record`)."""
        return {side: scheme.record() for side, scheme in self.schemes.items()}

    def apply_layer_norm_placement(self, args) -> None:
        """Switch on fairseq's ``--*-normalize-before`` for a Pre-LN-family scheme (that is what defines
        it); Post-LN and LayerNorm-free schemes have refused the flag in :func:`plan_model`."""
        if self.layer_norm == "pre":
            for side in self.schemes:
                setattr(args, f"{side}_normalize_before", True)

    def describe(self, model: str) -> str:
        """One log line: model, trained depths (kept ones when pruned), each side's scheme."""
        depths = "-".join(f"{n}L" for n in self.trained_layers.values())
        if self.kept_layers != self.trained_layers:
            depths += f" (built {'-'.join(f'{n}L' for n in self.kept_layers.values())} after --*-layers-to-keep)"
        if len(self.schemes) == 1:  # one side: the depth says which
            return f"{model} {depths}: {next(iter(self.schemes.values())).describe()}"
        sides = ", ".join(f"{side} {scheme.describe()}" for side, scheme in self.schemes.items())
        return f"{model} {depths}: {sides}"


def _kept_layers(args, side: str, trained: int) -> int:
    keep = getattr(args, f"{side}_layers_to_keep", None)  # "0,2" (a string) or [0, 2] (fairseq's parser)
    if not keep:
        return trained
    return len(keep.split(",")) if isinstance(keep, str) else len(keep)


def plan_model(args, sides: Sequence[str]) -> ModelPlan:
    """Resolve and validate the residual scheme of a model with the given ``sides`` (``("encoder",
    "decoder")``, ``("decoder",)`` for a language model, ``("encoder",)`` for RoBERTa) from ``args``
    (a Namespace or config holding the plugin's options and the layer counts).

    Constructs exactly one scheme object per side.  Raises :class:`DeepNetConfigError` naming the flag.
    """
    name = resolve_scheme_name(args)
    trained = {side: getattr(args, f"{side}_layers", 0) or 0 for side in SIDES if side in sides}
    if not any(trained.values()):
        raise DeepNetConfigError(f"{'/'.join(flag(side + '_layers') for side in sides)}: a model needs layers")
    validate_run_options(args, name, trained)
    cls = scheme_class(name)
    options = resolve_options(cls.Options, args)
    run = {setting: bool(getattr(args, setting, False)) for setting in RUN_SETTINGS}
    cls.validate(options, run, trained)
    share = bool(getattr(args, "share_all_embeddings", False))
    depths = {side: trained.get(side, 0) for side in SIDES}
    schemes = {
        side: cls(SchemeContext(side, depths["encoder"], depths["decoder"], options, share_all_embeddings=share))
        for side in trained
    }
    kept = {side: _kept_layers(args, side, n) for side, n in trained.items()}
    return ModelPlan(name, cls.layer_norm, trained, kept, schemes)
