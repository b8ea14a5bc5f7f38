"""The paper's model sizes, built on PyTorch's meta device (no memory), and their training memory.

``task.build_model`` runs under ``with torch.device("meta")``: every parameter gets a shape but no
storage, so the 1,000-layer and the 3.2B models are the real fairseq/plugin modules (DeepNorm init
included, as a no-op on meta tensors) at zero memory cost.  Parameter counts depend on the
vocabulary and on embedding sharing, which the paper does not pin down for each model, so several
assumptions are listed and compared with the paper's figure.

Training memory per GPU is the usual mixed-precision + Adam estimate of 16 bytes per parameter
(fp16 weights 2 + fp16 gradients 2 + fp32 master weights 4 + fp32 Adam first and second moments
4 + 4), unsharded (DDP: every GPU holds everything) and fully sharded over 8 GPUs (FSDP/ZeRO-3:
1/8 each).  Activations come on top; with ``--checkpoint-activations`` the stored part is one fp16
``tokens x dim`` tensor per layer boundary, given here for a stated number of tokens per GPU.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from benchmarks import common

BYTES_PER_PARAM = {"fp16_weights": 2, "fp16_grads": 2, "fp32_master": 4, "adam_m": 4, "adam_v": 4}
SHARDS = 8
GIB = 2**30

PAPER_MODELS = [
    {
        "name": "1000L (500L-500L) base",
        "arch": "deepnet_transformer",
        "layers": 500,
        "paper_params": 3.8e9,
        "paper_note": "OPUS-100 1000-layer model, reported as 3.8B",
    },
    {
        "name": "200L (100L-100L) big",
        "arch": "deepnet_transformer_big",
        "layers": 100,
        "paper_params": 3.2e9,
        "paper_note": "M2M-scale 100L-100L model (1024/4096/16 heads), reported as 3.2B",
    },
]
EMBEDDING_OPTIONS = {
    "shared (1 matrix)": ["--share-all-embeddings"],
    "decoder in/out tied (2 matrices)": ["--share-decoder-input-output-embed"],
    "untied (3 matrices)": [],
}


def embedding_params(model: Any) -> int:
    """Parameters in distinct embedding / output-projection matrices (shared ones counted once)."""
    seen = {}
    for module in (model.encoder.embed_tokens, model.decoder.embed_tokens, model.decoder.output_projection):
        seen[id(module.weight)] = module.weight.numel()
    return sum(seen.values())


def memory_estimate(params: int, layers_total: int, dim: int, tokens_per_gpu: int) -> Dict[str, float]:
    """Per-GPU training memory in GiB: 16 B/param states, unsharded and FSDP over 8 GPUs, + activations."""
    per_param = sum(BYTES_PER_PARAM.values())
    states = params * per_param / GIB
    ckpt_acts = layers_total * tokens_per_gpu * dim * 2 / GIB
    return {
        "bytes_per_param": per_param,
        "states_unsharded_gib": states,
        "states_fsdp8_gib": states / SHARDS,
        "checkpointed_activations_gib": ckpt_acts,
        "tokens_per_gpu_assumed": tokens_per_gpu,
        "total_unsharded_gib": states + ckpt_acts,
        "total_fsdp8_gib": states / SHARDS + ckpt_acts,
    }


def build_meta(arch: str, layers: int, vocab: int, sharing: Sequence[str]) -> Dict[str, Any]:
    """Build one model on the meta device and count its parameters."""
    import torch

    with tempfile.TemporaryDirectory() as tmp, common.quiet_logging():
        # the dictionary file gets vocab - 4 words; fairseq adds <s>, <pad>, </s>, <unk>
        data = common.write_dictionary(Path(tmp), vocab - 4)
        flags = ["--deepnorm", "--encoder-layers", str(layers), "--decoder-layers", str(layers), *sharing]
        start = time.perf_counter()
        args, task, model = common.build(data, arch, flags, meta=True)
        build_s = time.perf_counter() - start
        devices = {p.device.type for p in model.parameters()}
        params = sum(p.numel() for p in model.parameters())
        emb = embedding_params(model)
        return {
            "vocab": len(task.source_dictionary),
            "params": params,
            "embedding_params": emb,
            "non_embedding_params": params - emb,
            "dim": args.encoder_embed_dim,
            "ffn": args.encoder_ffn_embed_dim,
            "heads": args.encoder_attention_heads,
            "devices": sorted(devices),
            "build_s": build_s,
            "all_meta": devices == {torch.device("meta").type},
        }


def benchmark(
    models: Sequence[Dict[str, Any]], vocabs: Sequence[int], embeddings: Sequence[str], tokens_per_gpu: int
) -> Dict[str, Any]:
    """Meta-device builds of every model x vocabulary x embedding-sharing assumption."""
    out: List[Dict[str, Any]] = []
    for spec in models:
        variants = []
        for vocab in vocabs:
            for emb_name in embeddings:
                common.log(f"paper scale {spec['name']}: vocab {vocab}, embeddings {emb_name} (meta device)")
                built = build_meta(spec["arch"], spec["layers"], vocab, EMBEDDING_OPTIONS[emb_name])
                built["embeddings"] = emb_name
                built["vs_paper"] = built["params"] / spec["paper_params"]
                built["memory"] = memory_estimate(built["params"], 2 * spec["layers"], built["dim"], tokens_per_gpu)
                variants.append(built)
        best = min(variants, key=lambda v: abs(v["vs_paper"] - 1.0))
        out.append({**spec, "variants": variants, "closest_to_paper": best})
    return {
        "device": "meta (torch.device('meta') context around task.build_model)",
        "bytes_per_param": BYTES_PER_PARAM,
        "fsdp_shards": SHARDS,
        "models": out,
    }
