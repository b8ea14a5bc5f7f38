"""``deepnet_lm``: a decoder-only (GPT-style) Transformer LM with DeepNorm (or another
``--residual-scheme``), task ``language_modeling``.

With ``--deepnorm`` the decoder-only constants apply: alpha = (2M)^(1/4), beta = (8M)^(-1/4).
Unlike fairseq's named ``transformer_lm_*`` architectures (which force Pre-LN), ``deepnet_lm`` is
Post-LN unless ``--decoder-normalize-before`` is given, so ``--deepnorm`` is real DeepNorm.
"""


import logging
from dataclasses import dataclass

from fairseq.models import register_model
from fairseq.models.transformer import TransformerConfig
from fairseq.models.transformer_lm import (
    DEFAULT_MAX_TARGET_POSITIONS,
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
)
from fairseq.utils import safe_getattr

from deepnet_fairseq.models.options import DeepNetOptions, validate_shapes
from deepnet_fairseq.models.plan import plan_model
from deepnet_fairseq.models.training import DeepNetModelMixin, attach_instruments, training_forward
from deepnet_fairseq.modules.stacks import DeepNetDecoder
from deepnet_fairseq.schemes import DeepNetConfigError

logger = logging.getLogger(__name__)


@dataclass
class DeepNetLMConfig(TransformerLanguageModelConfig, DeepNetOptions):
    """fairseq's ``transformer_lm`` options plus the DeepNorm options."""


@register_model("deepnet_lm", dataclass=DeepNetLMConfig)
class DeepNetLanguageModel(DeepNetModelMixin, TransformerLanguageModel):
    """Decoder-only Transformer LM; DeepNorm on with ``--deepnorm``."""

    @classmethod
    def build_model(cls, args, task):
        if safe_getattr(args, "character_embeddings", False) or safe_getattr(args, "adaptive_input", False):
            raise DeepNetConfigError(
                "deepnet_lm supports token embeddings only: remove --character-embeddings / --adaptive-input"
            )
        validate_shapes(args, ("decoder",))
        plan = plan_model(args, ("decoder",))
        plan.apply_layer_norm_placement(args)
        logger.info(plan.describe("deepnet_lm"))
        if args.decoder_layers_to_keep:
            args.decoder_layers = len(args.decoder_layers_to_keep.split(","))
        if safe_getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = safe_getattr(args, "tokens_per_sample", DEFAULT_MAX_TARGET_POSITIONS)

        embed_tokens = cls.build_embedding(args, task.source_dictionary, args.decoder_input_dim)
        decoder = DeepNetDecoder(
            TransformerConfig.from_namespace(args),
            task.target_dictionary,
            embed_tokens,
            plan.decoder,
            no_encoder_attn=True,
        )
        model = cls(decoder)
        model.residual_scheme_record = plan.record()
        attach_instruments(model, args)
        return model

    def forward(self, src_tokens, **kwargs):
        net_input = {"src_tokens": src_tokens}
        return training_forward(
            self, net_input, lambda: super(DeepNetLanguageModel, self).forward(src_tokens, **kwargs)
        )

