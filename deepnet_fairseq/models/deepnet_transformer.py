"""``deepnet_transformer``: fairseq's encoder-decoder Transformer with DeepNorm (Wang et al. 2022)
and the other residual schemes of the paper's comparison (``--residual-scheme``).

Without ``--deepnorm``/``--residual-scheme`` the model is exactly fairseq's Post-LN ``transformer``
(same modules, same parameter names, same numerics).  With ``--deepnorm`` every sub-layer computes
``LN(alpha * x + G(x))`` and the layers start from DeepNorm's beta-scaled Xavier init, with the
constants of :func:`deepnet_fairseq.deepnorm_coefficients` for the true N encoder / M decoder layers.
"""

from __future__ import annotations

import argparse
import logging
from contextvars import ContextVar
from typing import Optional

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig
from fairseq.models.transformer.transformer_legacy import TransformerModel, base_architecture
from omegaconf import OmegaConf

from deepnet_fairseq.models.options import DeepNetOptions, fill_option_defaults, validate_shapes
from deepnet_fairseq.models.plan import ModelPlan, plan_model
from deepnet_fairseq.models.training import DeepNetModelMixin, attach_instruments, training_forward
from deepnet_fairseq.modules.stacks import DeepNetDecoder, DeepNetEncoder

logger = logging.getLogger(__name__)


@register_model("deepnet_transformer")
class DeepNetTransformerModel(DeepNetModelMixin, TransformerModel):
    """Encoder-decoder Transformer; DeepNorm on with ``--deepnorm``, other schemes by name."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        # no defaults on the parser: architecture functions fill them (fairseq's legacy convention)
        gen_parser_from_dataclass(parser, DeepNetOptions(), delete_default=True, with_prefix="")

    @classmethod
    def build_model(cls, args, task):
        if OmegaConf.is_config(args):
            # fairseq-hydra-train hands legacy models a DictConfig; a Namespace keeps every field
            args = argparse.Namespace(**OmegaConf.to_container(args, resolve=True))
        deepnet_transformer_architecture(args)
        validate_shapes(args, ("encoder", "decoder"))
        _layers_to_keep_as_text(args)
        plan = plan_model(args, ("encoder", "decoder"))
        plan.apply_layer_norm_placement(args)
        logger.info(plan.describe("deepnet_transformer"))
        # fairseq's build_model prunes --*-layers-to-keep and calls the build_encoder/build_decoder hooks
        token = _BUILDING_PLAN.set(plan)
        try:
            model = super().build_model(args, task)
        finally:
            _BUILDING_PLAN.reset(token)
        model.residual_scheme_record = plan.record()
        attach_instruments(model, args)
        return model

    def forward(self, src_tokens, src_lengths, prev_output_tokens, **kwargs):
        net_input = {"src_tokens": src_tokens, "src_lengths": src_lengths, "prev_output_tokens": prev_output_tokens}
        return training_forward(
            self, net_input, lambda: super(DeepNetTransformerModel, self).forward(
                src_tokens, src_lengths, prev_output_tokens, **kwargs)
        )

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        return DeepNetEncoder(TransformerConfig.from_namespace(args), src_dict, embed_tokens, _building_plan().encoder)

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(args)
        return DeepNetDecoder(cfg, tgt_dict, embed_tokens, _building_plan().decoder,
                              no_encoder_attn=cfg.no_cross_attention)


def _layers_to_keep_as_text(args) -> None:
    """``--encoder/decoder-layers-to-keep`` as the comma-separated text fairseq's ``build_model`` and
    checkpoint pruning split: fairseq's command-line parser turns ``0,2`` into the list ``[0, 2]``
    (``--model-overrides`` keeps the text), on which they fail with ``AttributeError``."""
    for side in ("encoder", "decoder"):
        keep = getattr(args, f"{side}_layers_to_keep", None)
        if isinstance(keep, (list, tuple)):
            setattr(args, f"{side}_layers_to_keep", ",".join(str(int(index)) for index in keep))


# The plan build_model resolved for the trained depths, while fairseq's build_model calls the
# build_encoder/build_decoder hooks with the (possibly pruned) layer counts.
_BUILDING_PLAN: ContextVar[Optional[ModelPlan]] = ContextVar("deepnet_building_plan", default=None)


def _building_plan() -> ModelPlan:
    plan = _BUILDING_PLAN.get()
    if plan is None:
        raise RuntimeError(
            "DeepNetTransformerModel.build_encoder/build_decoder are called by its build_model, which resolves "
            "the residual scheme for both sides first; build the model with build_model (or task.build_model)"
        )
    return plan


@register_model_architecture("deepnet_transformer", "deepnet_transformer")
def deepnet_transformer_architecture(args):
    """Base size (512/2048, 8 heads, 6L-6L), fairseq's ``transformer`` defaults."""
    fill_option_defaults(args)
    base_architecture(args)


@register_model_architecture("deepnet_transformer", "deepnet_transformer_big")
def deepnet_transformer_big(args):
    """1024/4096, 16 heads, dropout 0.1: the paper's 100L-100L (3.2B) model family (Table 8)."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 1024)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 4096)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 16)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 1024)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", 4096)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 16)
    args.dropout = getattr(args, "dropout", 0.1)
    deepnet_transformer_architecture(args)


@register_model_architecture("deepnet_transformer", "deepnet_transformer_tiny")
def deepnet_transformer_tiny(args):
    """64/128, 2 heads: the paper's analysis models (Fig. 5, "64-128-2")."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 128)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 2)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 64)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", 128)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 2)
    deepnet_transformer_architecture(args)
