"""Export a deepnet checkpoint as fairseq's own ``transformer`` (``deepnet_lm``: ``transformer_lm``), with
DeepNorm's alpha folded into the weights.

Why it works
------------
A Post-LN stack is a chain of sub-layers k = 1..K (encoder layer: self-attention, FFN; decoder layer:
self-attention, cross-attention, FFN).  DeepNorm (and Admin) compute, with ``x_0`` the embedding output,

    x_k = LN_k(w_k * x_{k-1} + G_k(x_{k-1}))            (w_k = alpha, or Admin's vector omega_k)

and fairseq's ``transformer`` computes ``y_k = LN'_k(y_{k-1} + G'_k(y_{k-1}))``.  A branch ``G_k``
reads its input only through affine *input projections* ``P(x) = W x + b``: q/k/v of self-attention,
q of cross-attention (its keys and values read the encoder output), fc1 of the FFN.  Suppose the
stock stream carries ``y_{k-1} = w_k * x_{k-1}``.  With ``W' = W diag(1 / w_k)`` and ``b' = b``,

    W' (w_k * x) + b = W x + b,   so   G'_k(y_{k-1}) = G_k(x_{k-1})

(queries, keys and values are unchanged, hence the attention scores, the softmax and its scaling
too), and the stock LayerNorm sees ``y_{k-1} + G'_k(y_{k-1}) = w_k * x_{k-1} + G_k(x_{k-1})``: exactly
DeepNorm's LayerNorm input.  For the next sub-layer the stream must be ``y_k = w_{k+1} * x_k``:
multiply ``LN_k``'s weight *and* bias by ``w_{k+1}`` (``w * (g * n + b) = (w * g) * n + w * b``).
The last LayerNorm of a stack feeds no sub-layer of its own stack and is left unchanged, so the
encoder output (read by cross-attention's k/v) and the decoder features (read by the output
projection) are the DeepNet model's, bit for bit up to rounding.  Because every LayerNorm sees its
DeepNet input exactly, LayerNorm's ``eps`` needs no correction (the other route, dividing each
branch by alpha, relies on ``LN(alpha * z) = LN(z)``, which ``eps`` breaks).

The first sub-layer's stream is the embedding ``x_0 = s * E[token] + P[position]`` (``s`` =
``sqrt(d)`` unless ``--no-scale-embedding``; dropout and the zeroing of padded positions act per
channel and commute with the scale).  ``y_0 = w_1 * x_0`` is obtained by

* scaling ``layernorm_embedding``'s weight and bias, when the model has one (``--layernorm-embedding``);
* otherwise scaling the columns of the token table (or, with a decoder ``project_in_dim``, as language
  models with ``--decoder-input-dim`` have, the rows of that bias-free projection) and of the learned
  position table; sinusoidal positions have no parameters, so they are exported as a *learned* table
  holding ``w_1 * sinusoid`` (``--encoder/decoder-learned-pos`` set in the exported configuration).

A token table scaled for one side can no longer be shared: with ``--share-all-embeddings`` the
encoder and decoder get their own (differently scaled) tables, and with
``--share-decoder-input-output-embed`` the output projection keeps the *unscaled* table as its own
parameter; the exported configuration turns those flags off exactly when the tensors differ.

Schemes
-------
:data:`FOLDED` schemes get the folding above; :data:`AS_IS` schemes already are a stock network
(Post-LN, or fairseq's own Pre-LN) and are copied unchanged; :data:`REFUSED` schemes compute
something fairseq's ``transformer`` has no module for, and :class:`ExportError` names the reason.
fairseq's own NormFormer options of ``transformer_lm`` (``--scale-attn`` ...) act inside the branches
or multiply the residual linearly, so the folding would hold, but stock fairseq cannot load such a
checkpoint of its own (see :func:`check_exportable`): they are refused.

The exported checkpoint holds only dicts, lists, strings, numbers and tensors, so stock fairseq on
PyTorch >= 2.6 loads it with ``torch.load``'s default ``weights_only=True`` and without
``--user-dir`` (:func:`export_state`).
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from deepnet_fairseq.scheme_record import describe, record_from_model_config

# this plugin's models and the fairseq model each is exported as
STOCK_MODELS = {"deepnet_transformer": "transformer", "deepnet_lm": "transformer_lm"}

FOLDED = {
    "deepnorm": "residual weight alpha folded into the LayerNorms and input projections",
    "admin": "profiled omega vectors folded into the LayerNorms and input projections",
    "admin-closed": "omega (the constant, or the trained vectors) folded into the LayerNorms and input projections",
}
AS_IS = {
    "post-ln": "fairseq's Post-LN: weights copied unchanged",
    "post-ln-init": "an initialisation only; the trained network is Post-LN: weights copied unchanged",
    "ds-init": "an initialisation only; the trained network is Post-LN: weights copied unchanged",
    "pre-ln": "fairseq's own Pre-LN (--encoder/decoder-normalize-before): weights copied unchanged",
}
REFUSED = {
    "t-fixup": "it has no LayerNorm (x + G(x)), and every sub-layer of fairseq's transformer has one",
    "rezero": "it has no LayerNorm and scales each branch by a learned scalar",
    "r-fixup": "it has no LayerNorm and adds learned scalar shifts inside every branch",
    "dlcl": "each layer reads a learned combination of all earlier layers' outputs",
    "normformer": "it adds LayerNorms and head scales inside the branches (and an FFN residual scale)",
    "sub-ln": "it adds a LayerNorm inside every branch",
    "sandwich-ln": "it adds a LayerNorm on every branch's output",
}

# the sub-layers of a layer, in the order they run
SUBLAYERS = {"encoder": ("self_attn", "ffn"), "decoder": ("self_attn", "encoder_attn", "ffn")}
# the affine maps through which a sub-layer's branch reads the stream (cross-attention's k/v read the encoder)
INPUT_PROJECTIONS = {
    "self_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "encoder_attn": ("encoder_attn.q_proj",),
    "ffn": ("fc1",),
}
# the Post-LN LayerNorm that closes each sub-layer
OUTPUT_NORM = {"self_attn": "self_attn_layer_norm", "encoder_attn": "encoder_attn_layer_norm",
               "ffn": "final_layer_norm"}
# scheme state that the folded weights replace
SCHEME_STATE_PREFIXES = ("admin_omega_", "admin_profiled")
# options that only matter for training; the exported model is for inference
TRAINING_ONLY_OPTIONS = {"checkpoint_activations": False, "offload_activations": False}
# tasks whose dictionaries are fairseq's ``Dictionary`` read from dict files, which list no special symbols:
# their padding index is the one ``Dictionary()`` gives itself
DICTIONARY_FILE_TASKS = ("translation", "language_modeling", "translation_multi_simple_epoch")


class ExportError(ValueError):
    """A checkpoint that cannot be expressed as fairseq's own ``transformer``; the message says why."""


Weights = Dict[str, List[Tuple[int, str, Tensor]]]


def model_config_dict(model_cfg: Any) -> Dict[str, Any]:
    """The model configuration of a checkpoint (``cfg.model`` or ``args``) as a plain ``dict``."""
    from omegaconf import OmegaConf

    if model_cfg is None:
        raise ExportError("the checkpoint stores no model configuration (neither cfg.model nor args)")
    if isinstance(model_cfg, argparse.Namespace):
        return dict(vars(model_cfg))
    if OmegaConf.is_config(model_cfg):
        return OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True)
    if isinstance(model_cfg, Mapping):
        return dict(model_cfg)
    raise ExportError(f"unsupported model configuration type {type(model_cfg).__name__}")


def plain(value: Any, where: str) -> Any:
    """``value`` as nested dicts/lists of str/int/float/bool/None (what ``weights_only`` loading accepts).

    ``argparse.Namespace`` and OmegaConf containers become dicts, tuples become lists; anything else
    raises :class:`ExportError` naming ``where`` (the key path).
    """
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ExportError(f"{where} holds a {type(value).__name__}, which a plain checkpoint cannot store")


def deepnet_model_name(config: Mapping[str, Any]) -> str:
    """``deepnet_transformer`` or ``deepnet_lm`` (the model of ``--arch``), or :class:`ExportError`."""
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    import deepnet_fairseq

    deepnet_fairseq.register()  # the plugin's architectures are looked up below
    arch = str(config.get("arch") or config.get("_name") or "")
    model = ARCH_MODEL_NAME_REGISTRY.get(arch)
    if model not in STOCK_MODELS:
        raise ExportError(
            f"--arch {arch or '(none)'}: only {' and '.join(STOCK_MODELS)} checkpoints (and their named "
            "architectures) can be exported; a checkpoint of fairseq's own architectures needs no export"
        )
    return model


def check_exportable(config: Mapping[str, Any], source: str = "") -> Dict[str, Dict[str, object]]:
    """The residual-scheme record of a deepnet model configuration, or :class:`ExportError`.

    Refuses other architectures, configurations without integer layer counts (``source``, the
    checkpoint's file, is named), :data:`REFUSED` schemes and options the folding does not cover.
    """
    deepnet_model_name(config)
    record = record_from_model_config(argparse.Namespace(**config))
    if record is None:
        layers = {f"--{side}-layers": config.get(f"{side}_layers") for side in ("encoder", "decoder")}
        raise ExportError(
            f"{source or 'the checkpoint'}: its model configuration has no integer layer count "
            f"({', '.join(f'{flag}={value!r}' for flag, value in layers.items())}), so its residual scheme "
            "and the folding cannot be determined"
        )
    for side, entry in record.items():
        scheme = entry["scheme"]
        if scheme in REFUSED:
            raise ExportError(
                f"the {side} uses --residual-scheme {scheme}, which fairseq's transformer cannot express: "
                f"{REFUSED[scheme]}"
            )
        if scheme not in FOLDED and scheme not in AS_IS:
            raise ExportError(f"--residual-scheme {scheme} has no export rule (known: {', '.join(known_schemes())})")
    for side in ("encoder", "decoder"):
        if config.get(f"{side}_layers_to_keep"):
            raise ExportError(
                f"--{side}-layers-to-keep is set in the checkpoint's configuration: export prunes no layers; "
                "export the full checkpoint (the pruned model's folding would differ)"
            )
    scales = [flag for flag in ("scale_attn", "scale_fc", "scale_heads", "scale_resids") if config.get(flag)]
    if scales:
        raise ExportError(
            f"{', '.join('--' + f.replace('_', '-') for f in scales)}: stock fairseq's transformer_lm loses these "
            "options when it loads a checkpoint (its TransformerConfig.from_namespace ignores extra keys of a "
            "DictConfig), so it could not load the exported weights"
        )
    if config.get("cross_self_attention"):
        raise ExportError("--cross-self-attention: the decoder's self-attention also reads the encoder output, "
                          "whose scale differs from the folded stream")
    return record


def known_schemes() -> Tuple[str, ...]:
    """Every scheme with an export rule (folded, copied or refused)."""
    return tuple(FOLDED) + tuple(AS_IS) + tuple(REFUSED)


def residual_weights(
    record: Mapping[str, Mapping[str, object]], state_dict: Mapping[str, Tensor], config: Mapping[str, Any]
) -> Weights:
    """``{side: [(layer index, sub-layer, w)]}`` in running order for every :data:`FOLDED` side.

    ``w`` is a float64 vector of the stream width: ``alpha`` (DeepNorm), the closed-form omega, or the
    checkpoint's omega vectors (Admin, ``--admin-omega-trainable``).  Raises :class:`ExportError` for a
    zero entry (nothing can be divided by it).
    """
    weights: Weights = {}
    for side, entry in record.items():
        if entry["scheme"] not in FOLDED:
            continue
        dim = int(config[f"{side}_embed_dim"])
        chain = []
        for index in range(int(config[f"{side}_layers"])):
            for sublayer in sublayers_of(side, state_dict):
                key = f"{side}.layers.{index}.admin_omega_{sublayer}"
                if key in state_dict:
                    w = state_dict[key].detach().to(torch.float64).reshape(-1)
                elif entry["scheme"] == "deepnorm":
                    w = torch.full((dim,), float(entry["alpha"]), dtype=torch.float64)
                elif entry["scheme"] == "admin-closed" and not entry["trainable"]:
                    w = torch.full((dim,), float(entry["omega"]), dtype=torch.float64)
                else:
                    raise ExportError(f"the checkpoint has no {key}, which --residual-scheme {entry['scheme']} trains")
                if w.numel() != dim:
                    raise ExportError(f"{key} has {w.numel()} entries, the stream has {dim} channels")
                if bool((w == 0).any()):
                    raise ExportError(f"{side} layer {index} {sublayer}: its residual weight has a zero entry, "
                                      "which cannot be folded (the input projections would be divided by 0)")
                chain.append((index, sublayer, w))
        weights[side] = chain
    return weights


def sublayers_of(side: str, state_dict: Mapping[str, Tensor]) -> Tuple[str, ...]:
    """The sub-layers of ``side``'s layers (a decoder without cross-attention has two)."""
    if side == "decoder" and f"{side}.layers.0.encoder_attn.q_proj.weight" not in state_dict:
        return ("self_attn", "ffn")
    return SUBLAYERS[side]


def dictionary_padding_index(task: Optional[str]) -> int:
    """The padding index of ``task``'s dictionaries (the stored ``--task``), or :class:`ExportError`.

    The model configuration does not store it (a ``pad`` there is fairseq's BLEU scorer's option), and
    the stock model sizes its learned position table by it; only :data:`DICTIONARY_FILE_TASKS` fix it.
    """
    if task not in DICTIONARY_FILE_TASKS:
        raise ExportError(
            f"--task {task or '(none stored)'}: the export cannot tell the padding index of its dictionary, "
            "which the learned position table replacing the sinusoidal positions needs (its size and zero "
            f"row); it knows the tasks {', '.join(DICTIONARY_FILE_TASKS)}"
        )
    from fairseq.data import Dictionary

    return Dictionary().pad()


def sinusoid_table(rows: int, dim: int, padding_idx: int) -> Tensor:
    """fairseq's sinusoidal position table (the buffer its ``SinusoidalPositionalEmbedding`` computes)."""
    from fairseq.modules import SinusoidalPositionalEmbedding

    return SinusoidalPositionalEmbedding.get_embedding(rows, dim, padding_idx)


def _scaled(tensor: Tensor, scale: Tensor, divide: bool = False) -> Tensor:
    """``tensor * scale`` (or ``/``) along its last dimension, computed in float64, in ``tensor``'s dtype."""
    wide = tensor.detach().to(torch.float64)
    return (wide / scale if divide else wide * scale).to(tensor.dtype)


def scale_embedding_output(
    state: Dict[str, Tensor], config: Dict[str, Any], side: str, scale: Tensor, task: Optional[str]
) -> None:
    """Make ``side``'s embedding output ``scale * x_0`` (in place on ``state``/``config``; see module doc).

    ``task`` (the stored ``--task``) gives the padding index when sinusoidal positions become a table."""
    norm = f"{side}.layernorm_embedding"
    if f"{norm}.weight" in state:
        state[f"{norm}.weight"] = _scaled(state[f"{norm}.weight"], scale)
        state[f"{norm}.bias"] = _scaled(state[f"{norm}.bias"], scale)
        return
    project_in = f"{side}.project_in_dim.weight"
    if project_in in state:  # rows = output channels of the bias-free projection
        state[project_in] = _scaled(state[project_in].t(), scale).t().contiguous()
    else:
        table = f"{side}.embed_tokens.weight"
        state[table] = _scaled(state[table], scale)
    if config.get("no_token_positional_embeddings"):
        return
    positions = f"{side}.embed_positions.weight"
    if config.get(f"{side}_learned_pos"):
        state[positions] = _scaled(state[positions], scale)
        return
    from fairseq.models.transformer import DEFAULT_MAX_SOURCE_POSITIONS, DEFAULT_MAX_TARGET_POSITIONS

    # what fairseq's build_model puts in a configuration without them (a language model: tokens_per_sample)
    limit = (config.get("max_source_positions") or DEFAULT_MAX_SOURCE_POSITIONS if side == "encoder"
             else config.get("max_target_positions") or config.get("tokens_per_sample") or DEFAULT_MAX_TARGET_POSITIONS)
    padding_idx = dictionary_padding_index(task)
    sinusoid = sinusoid_table(int(limit) + padding_idx + 1, int(config[f"{side}_embed_dim"]), padding_idx)
    state[positions] = _scaled(sinusoid.to(state[f"{side}.embed_tokens.weight"].dtype), scale)
    config[f"{side}_learned_pos"] = True


def fold_residual_weights(
    state_dict: Mapping[str, Tensor], config: Mapping[str, Any], weights: Weights, task: Optional[str]
) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """``(state dict, config)`` of the stock Post-LN network equal to the deepnet one (module docstring).

    ``weights`` comes from :func:`residual_weights`; sides not in it are copied; ``task`` is the stored
    ``--task`` (:func:`dictionary_padding_index`).  Scheme state (Admin's
    omega vectors and profiling flag) is dropped.  Tied token tables are untied where their scales differ.
    """
    state = {k: v for k, v in state_dict.items() if not _is_scheme_state(k)}
    new_config = dict(config)
    check_tied_tables(state, config)
    if _tied_output(config) and "decoder.output_projection.weight" not in state:
        state["decoder.output_projection.weight"] = state["decoder.embed_tokens.weight"]
    for side, chain in weights.items():
        previous: Optional[Tuple[int, str]] = None
        for index, sublayer, w in chain:
            if previous is None:
                scale_embedding_output(state, new_config, side, w, task)
            else:
                norm = f"{side}.layers.{previous[0]}.{OUTPUT_NORM[previous[1]]}"
                state[f"{norm}.weight"] = _scaled(state[f"{norm}.weight"], w)
                state[f"{norm}.bias"] = _scaled(state[f"{norm}.bias"], w)
            for projection in INPUT_PROJECTIONS[sublayer]:
                key = f"{side}.layers.{index}.{projection}.weight"
                state[key] = _scaled(state[key], w, divide=True)
            previous = (index, sublayer)
    _retie(state, new_config, config)
    return state, new_config


def _tied_output(config: Mapping[str, Any]) -> bool:
    return bool(config.get("share_decoder_input_output_embed") or config.get("share_all_embeddings"))


def check_tied_tables(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> None:
    """Refuse tables the configuration ties (one parameter when loaded) but the state dict holds different."""
    keys = []
    if config.get("share_all_embeddings"):
        keys = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
    elif _tied_output(config):
        keys = ["decoder.embed_tokens.weight"]
    if keys:
        keys.append("decoder.output_projection.weight")
    present = [key for key in keys if key in state_dict]
    if any(not torch.equal(state_dict[present[0]], state_dict[key]) for key in present[1:]):
        raise ExportError(f"the configuration ties {', '.join(present)} (--share-all-embeddings / "
                          "--share-decoder-input-output-embed), but the checkpoint holds different values for them")


def _is_scheme_state(key: str) -> bool:
    return key.rsplit(".", 1)[-1].startswith(SCHEME_STATE_PREFIXES)


def _retie(state: Dict[str, Tensor], new_config: Dict[str, Any], config: Mapping[str, Any]) -> None:
    """Keep embedding sharing only where the exported tensors are still equal; refuse what cannot untie."""
    encoder, decoder = state.get("encoder.embed_tokens.weight"), state["decoder.embed_tokens.weight"]
    share_output = _tied_output(config)
    if share_output:
        share_output = torch.equal(decoder, state["decoder.output_projection.weight"])
    share_all = bool(config.get("share_all_embeddings")) and share_output and torch.equal(encoder, decoder)
    untied = bool(config.get("share_all_embeddings")) and not share_all
    if untied and config.get("merge_src_tgt_embed"):
        raise ExportError("--merge-src-tgt-embed shares one token table, but the encoder and decoder need "
                          "differently scaled ones")
    if config.get("tie_adaptive_weights") and not share_output:
        raise ExportError("--tie-adaptive-weights ties the adaptive softmax to the token table, which the "
                          "folding scales")
    if "share_all_embeddings" in config:  # an encoder-decoder configuration
        new_config["share_all_embeddings"] = share_all
    new_config["share_decoder_input_output_embed"] = share_output
    if share_all:
        state["decoder.embed_tokens.weight"] = state["decoder.output_projection.weight"] = encoder
    elif share_output:
        state["decoder.output_projection.weight"] = decoder


def stock_model_config(config: Mapping[str, Any], record: Mapping[str, Mapping[str, object]]) -> Dict[str, Any]:
    """The folded configuration as fairseq's ``transformer`` (``transformer_lm``): model renamed, this
    plugin's options removed, training-only options off, and ``--*-normalize-before`` set for each side
    of ``record`` exactly when its network is ``pre-ln``.  Other keys the configuration lacks are not added
    (a dataclass model's configuration must hold only its dataclass's fields).

    The stored flag cannot be trusted: the Pre-LN scheme switches it on only in the object the model is
    built from, which is a copy of the stored configuration for a dataclass model (``deepnet_lm``) and
    under ``fairseq-hydra-train``."""
    from deepnet_fairseq.models.options import OPTION_DEFAULTS

    stock_name = STOCK_MODELS[deepnet_model_name(config)]
    plugin_options = set(OPTION_DEFAULTS) - {"_name"}  # FairseqDataclass's own field
    stock = {k: v for k, v in config.items() if k not in plugin_options}
    for key in ("arch", "_name"):
        if key in stock:
            stock[key] = stock_name
    if "user_dir" in stock:
        stock["user_dir"] = None
    stock.update({k: v for k, v in TRAINING_ONLY_OPTIONS.items() if k in stock})
    for side, entry in record.items():
        stock[f"{side}_normalize_before"] = entry["network"] == "pre-ln"
    return stock


def export_state(state: Mapping[str, Any], source: str = "") -> Dict[str, Any]:
    """A stock fairseq ``transformer`` checkpoint (a dict for ``torch.save``) computing what ``state`` does.

    ``state`` is a loaded deepnet checkpoint (``torch.load``).  The result keeps the checkpoint's
    configuration (``cfg``, as plain containers, ``common.user_dir`` cleared) and update count, drops
    optimizer and training state, and records in ``extra_state["deepnet_export"]`` what it was made from.
    """
    cfg = state.get("cfg")  # a dict, or the DictConfig itself (fairseq 0.10-0.11): both are Mappings
    if cfg is None:
        raise ExportError("the checkpoint has no cfg: not a checkpoint of fairseq >= 0.10 (this plugin's fairseq)")
    config = model_config_dict(cfg["model"])
    record = check_exportable(config, source)
    model = state.get("model")
    if not isinstance(model, Mapping):
        raise ExportError("the checkpoint has no model weights ('model' entry)")
    task = cfg.get("task")  # a dict, a DictConfig, or the Namespace of a task without a dataclass
    task = model_config_dict(task).get("_name") if task is not None else None
    folded, folded_config = fold_residual_weights(model, config, residual_weights(record, model, config), task)
    out_cfg = plain({**cfg, "model": stock_model_config(folded_config, record)}, "cfg")
    if isinstance(out_cfg.get("common"), dict):
        out_cfg["common"]["user_dir"] = None
    history = state.get("optimizer_history") or [{}]
    num_updates = int(history[-1].get("num_updates", 0))
    return {
        "args": None,
        "cfg": out_cfg,
        "model": folded,
        "optimizer_history": [
            {"criterion_name": str(history[-1].get("criterion_name", "CrossEntropyCriterion")),
             "optimizer_name": str(history[-1].get("optimizer_name", "none")),
             "lr_scheduler_state": {}, "num_updates": num_updates}
        ],
        "extra_state": {"deepnet_export": {"source": source, "record": plain(record, "record"),
                                           "scheme": describe(record)}},
        "last_optimizer_state": None,
    }


