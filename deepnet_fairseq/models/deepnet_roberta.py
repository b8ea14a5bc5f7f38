"""``deepnet_roberta``: fairseq's RoBERTa (an encoder-only Transformer for ``--task masked_lm`` and
fine-tuning with ``--task sentence_prediction``) with DeepNorm (or another ``--residual-scheme``).

With ``--deepnorm`` the encoder-only constants apply: alpha = (2N)^(1/4), beta = (8N)^(-1/4), N the
trained number of layers.  Without a scheme the model is fairseq's Post-LN ``roberta`` (same modules,
same parameter names, same numerics: the two load each other's state dicts).

Only fairseq's ``RobertaEncoder.build_encoder`` hook is replaced (by a :class:`DeepNetEncoder` whose
layers are scheme-driven); embedding, masking, the LM head, classification heads and the hub are
fairseq's own.  RoBERTa's own init is BERT's (``init_bert_params``: N(0, 0.02) linears and embeddings,
zero biases); here each layer gets it *in its constructor*, and then its scheme's init (DeepNorm's
beta-scaled Xavier-normal, ...), before activation checkpointing or FSDP wrapping; the embeddings get
it before the scheme's stack hook (T-Fixup scales the token embeddings); the LM head gets it in the
model's constructor, which, unlike fairseq's, does not re-initialise the layers afterwards.

``layernorm_embedding`` (RoBERTa's LayerNorm on the embedding output) stays on by default for
Post-LN schemes (as in ``roberta``), is off by default for Pre-LN-family schemes (as in
``roberta_prenorm``; ``--layernorm-embedding`` turns it on) and absent for LayerNorm-free schemes.
"""

from __future__ import annotations

import argparse
import logging
from functools import partial
from typing import Tuple

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import FairseqEncoderModel, register_model, register_model_architecture
from fairseq.models.roberta.model import RobertaEncoder, RobertaModel, roberta_base_architecture
from fairseq.models.transformer import TransformerConfig
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from fairseq.utils import safe_getattr, safe_hasattr
from omegaconf import OmegaConf
from torch import nn

from deepnet_fairseq.models.options import (
    DeepNetOptions,
    fill_option_defaults,
    resolve_scheme_name,
    validate_shapes,
)
from deepnet_fairseq.models.plan import plan_model
from deepnet_fairseq.models.training import DeepNetModelMixin, attach_instruments, training_forward
from deepnet_fairseq.modules.layers import DeepNetEncoderLayer
from deepnet_fairseq.modules.stacks import DeepNetEncoder, wrap_layer
from deepnet_fairseq.schemes import SCHEMES, ResidualScheme

logger = logging.getLogger(__name__)


class DeepNetRobertaEncoderLayer(DeepNetEncoderLayer):
    """A scheme-driven encoder layer that starts from RoBERTa's (BERT's) init, which its scheme's init
    then replaces or rescales, both inside the constructor."""

    def _attach_scheme(self, scheme: ResidualScheme, index: int, sublayers: Tuple[str, ...]) -> None:
        self.apply(init_bert_params)
        super()._attach_scheme(scheme, index, sublayers)


class DeepNetRobertaStack(DeepNetEncoder):
    """:class:`DeepNetEncoder` with :class:`DeepNetRobertaEncoderLayer` layers."""

    def build_encoder_layer(self, cfg):
        self._layers_built += 1
        layer = DeepNetRobertaEncoderLayer(cfg, self.scheme, index=self._layers_built, return_fc=self.return_fc)
        return wrap_layer(layer, cfg)


class DeepNetRobertaEncoder(RobertaEncoder):
    """fairseq's RoBERTa encoder (embeddings, LM head) around a scheme-driven layer stack."""

    def __init__(self, args, dictionary, scheme: ResidualScheme):
        self.scheme = scheme  # read by build_encoder, which RobertaEncoder's constructor calls
        super().__init__(args, dictionary)

    def build_encoder(self, args, dictionary, embed_tokens):
        init_bert_params(embed_tokens)  # before the scheme's stack hook (T-Fixup scales the table)
        stack = DeepNetRobertaStack(TransformerConfig.from_namespace(args), dictionary, embed_tokens, self.scheme)
        if stack.embed_positions is not None:
            init_bert_params(stack.embed_positions)
        return stack


@register_model("deepnet_roberta")
class DeepNetRobertaModel(DeepNetModelMixin, RobertaModel):
    """Encoder-only RoBERTa; DeepNorm on with ``--deepnorm``, other schemes by name."""

    def __init__(self, args, encoder):
        # RobertaModel.__init__ re-initialises every module with BERT's init, which would undo the
        # schemes' layer init; the encoder initialised its embeddings and layers, the LM head is left
        FairseqEncoderModel.__init__(self, encoder)
        self.args = args
        encoder.lm_head.apply(init_bert_params)
        self.classification_heads = nn.ModuleDict()

    @classmethod
    def add_args(cls, parser):
        RobertaModel.add_args(parser)
        # no defaults on the parser: architecture functions fill them (fairseq's legacy convention)
        gen_parser_from_dataclass(parser, DeepNetOptions(), delete_default=True, with_prefix="")

    @classmethod
    def build_model(cls, args, task):
        if OmegaConf.is_config(args):
            # fairseq-hydra-train hands legacy models a DictConfig; a Namespace keeps every field
            args = argparse.Namespace(**OmegaConf.to_container(args, resolve=True))
        deepnet_roberta_architecture(args)
        validate_shapes(args, ("encoder",))
        plan = plan_model(args, ("encoder",))
        plan.apply_layer_norm_placement(args)
        logger.info(plan.describe("deepnet_roberta"))
        if not safe_hasattr(args, "max_positions"):
            if not safe_hasattr(args, "tokens_per_sample"):
                args.tokens_per_sample = task.max_positions()
            args.max_positions = args.tokens_per_sample
        model = cls(args, DeepNetRobertaEncoder(args, task.source_dictionary, plan.encoder))
        model.residual_scheme_record = plan.record()
        attach_instruments(model, args)
        return model

    def forward(self, src_tokens, *args, **kwargs):
        run = partial(super().forward, src_tokens, *args, **kwargs)
        return training_forward(self, {"src_tokens": src_tokens}, run)


@register_model_architecture("deepnet_roberta", "deepnet_roberta")
def deepnet_roberta_architecture(args):
    """RoBERTa-base size (768/3072, 12 heads, 12L), fairseq's ``roberta`` defaults."""
    fill_option_defaults(args)
    if SCHEMES[resolve_scheme_name(args)].layer_norm != "post":
        # as roberta_prenorm; a LayerNorm-free scheme refuses an explicit --layernorm-embedding
        args.layernorm_embedding = safe_getattr(args, "layernorm_embedding", False)
    roberta_base_architecture(args)


@register_model_architecture("deepnet_roberta", "deepnet_roberta_base")
def deepnet_roberta_base(args):
    """Same as ``deepnet_roberta`` (RoBERTa-base size)."""
    deepnet_roberta_architecture(args)


@register_model_architecture("deepnet_roberta", "deepnet_roberta_tiny")
def deepnet_roberta_tiny(args):
    """64/128, 2 heads, 12 layers unless ``--encoder-layers``: the paper's analysis width ("64-128-2")."""
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = safe_getattr(args, "encoder_ffn_embed_dim", 128)
    args.encoder_attention_heads = safe_getattr(args, "encoder_attention_heads", 2)
    deepnet_roberta_architecture(args)
