"""Generate ``configs/*.yaml`` (fairseq-hydra-train) from the exact fairseq-train flags of the recipes' train.sh.

    PYTHONPATH=scripts python -m deepnet_recipes.configs [--check]

Each config is the flag list that ``scripts/<recipe>/train.sh`` runs (whose hyperparameters come from
:mod:`deepnet_recipes.paper`), translated flag by flag into hydra groups, so the two cannot drift:
``tests/test_recipes.py`` regenerates every file and compares. A flag without a hydra key here is an error.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from deepnet_recipes.common import REPO

CONFIG_DIR = REPO / "configs"

# flag -> (hydra group, key, kind); kind: "str", "int", "float", "bool" (a switch), "list" (one-element list),
# "pair" (a Python tuple literal, e.g. adam betas)
FLAG_KEYS: Dict[str, Tuple[str, str, str]] = {
    "--task": ("task", "_name", "str"), "--source-lang": ("task", "source_lang", "str"),
    "--target-lang": ("task", "target_lang", "str"), "--lang-dict": ("task", "lang_dict", "str"),
    "--lang-pairs": ("task", "lang_pairs", "str"), "--encoder-langtok": ("task", "encoder_langtok", "str"),
    "--decoder-langtok": ("task", "decoder_langtok", "bool"), "--langtoks": ("task", "langtoks", "str"),
    "--sampling-method": ("task", "sampling_method", "str"),
    "--sampling-temperature": ("task", "sampling_temperature", "float"),
    "--arch": ("model", "_name", "str"), "--residual-scheme": ("model", "residual_scheme", "str"),
    "--encoder-layers": ("model", "encoder_layers", "int"), "--decoder-layers": ("model", "decoder_layers", "int"),
    "--encoder-embed-dim": ("model", "encoder_embed_dim", "int"),
    "--decoder-embed-dim": ("model", "decoder_embed_dim", "int"),
    "--encoder-ffn-embed-dim": ("model", "encoder_ffn_embed_dim", "int"),
    "--decoder-ffn-embed-dim": ("model", "decoder_ffn_embed_dim", "int"),
    "--encoder-attention-heads": ("model", "encoder_attention_heads", "int"),
    "--decoder-attention-heads": ("model", "decoder_attention_heads", "int"),
    "--share-all-embeddings": ("model", "share_all_embeddings", "bool"),
    "--dropout": ("model", "dropout", "float"), "--allow-rezero-fp16": ("model", "allow_rezero_fp16", "bool"),
    "--checkpoint-activations": ("model", "checkpoint_activations", "bool"),
    "--stop-on-divergence-patience": ("model", "stop_on_divergence_patience", "int"),
    "--optimizer": ("optimizer", "_name", "str"), "--adam-betas": ("optimizer", "adam_betas", "pair"),
    "--adam-eps": ("optimizer", "adam_eps", "float"), "--weight-decay": ("optimizer", "weight_decay", "float"),
    "--lr-scheduler": ("lr_scheduler", "_name", "str"),
    "--warmup-updates": ("lr_scheduler", "warmup_updates", "int"),
    "--warmup-init-lr": ("lr_scheduler", "warmup_init_lr", "float"),
    "--criterion": ("criterion", "_name", "str"), "--label-smoothing": ("criterion", "label_smoothing", "float"),
    "--lr": ("optimization", "lr", "list"), "--clip-norm": ("optimization", "clip_norm", "float"),
    "--max-update": ("optimization", "max_update", "int"), "--max-epoch": ("optimization", "max_epoch", "int"),
    "--update-freq": ("optimization", "update_freq", "list"), "--max-tokens": ("dataset", "max_tokens", "int"),
    "--fp16": ("common", "fp16", "bool"), "--seed": ("common", "seed", "int"),
    "--log-format": ("common", "log_format", "str"), "--log-interval": ("common", "log_interval", "int"),
    "--no-progress-bar": ("common", "no_progress_bar", "bool"),
    "--keep-last-epochs": ("checkpoint", "keep_last_epochs", "int"),
    "--no-epoch-checkpoints": ("checkpoint", "no_epoch_checkpoints", "bool"),
    "--save-interval-updates": ("checkpoint", "save_interval_updates", "int"),
    "--keep-interval-updates": ("checkpoint", "keep_interval_updates", "int"),
    "--ddp-backend": ("distributed_training", "ddp_backend", "str"),
    "--distributed-world-size": ("distributed_training", "distributed_world_size", "int"),
}
GROUP_ORDER = ["common", "task", "model", "criterion", "optimizer", "lr_scheduler", "optimization", "dataset",
               "checkpoint", "distributed_training"]


def yaml_scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            text = text.replace("e", ".0e", 1)  # YAML 1.1 reads 1e-08 as a string, 1.0e-08 as a float
        return text if ("e" in text or "." in text) else text + ".0"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_scalar(v) for v in value) + "]"
    text = str(value)
    if text == "???" or text.replace("_", "").replace("-", "").replace(".", "").isalnum():
        return text
    return "'" + text.replace("'", "''") + "'"


def flags_to_groups(flags: List[str]) -> Dict[str, Dict[str, object]]:
    """fairseq-train flags (without the data path) -> {hydra group: {key: value}}."""
    groups: Dict[str, Dict[str, object]] = {}
    i = 0
    while i < len(flags):
        flag = flags[i]
        if flag not in FLAG_KEYS:
            raise ValueError(f"configs.py: no hydra key for fairseq flag {flag!r} (add it to FLAG_KEYS)")
        group, key, kind = FLAG_KEYS[flag]
        if kind == "bool":
            value: object = True
            i += 1
        else:
            text = flags[i + 1]
            i += 2
            if kind == "int":
                value = int(text)
            elif kind == "float":
                value = float(text)
            elif kind == "list":
                value = [float(text)] if key == "lr" else [int(text)]
            elif kind == "pair":
                value = list(ast.literal_eval(text))
            else:
                value = text
        groups.setdefault(group, {})[key] = value
    return groups


def render(name: str, header: List[str], flags: List[str]) -> str:
    """One config file: ``header`` comment lines, then the groups of ``flags``."""
    groups = flags_to_groups(flags)
    groups.setdefault("task", {})["data"] = "???"
    groups.setdefault("common", {})["user_dir"] = "deepnet_fairseq"
    lines = ["# @package _group_", f"# GENERATED by `PYTHONPATH=scripts python -m deepnet_recipes.configs` ({name});",
             "# do not edit: change scripts/deepnet_recipes/paper.py or the recipe module and regenerate.",
             *[f"# {line}" if line else "#" for line in header]]
    for group in GROUP_ORDER:
        if group in groups:
            lines.append(f"{group}:")
            items = sorted(groups[group].items(), key=lambda kv: (kv[0] != "_name", kv[0] != "data"))
            lines += [f"  {key}: {yaml_scalar(value)}" for key, value in items]
    return "\n".join(lines) + "\n"


def _bilingual(flags: List[str], gpus: int, update_freq: int) -> List[str]:
    from deepnet_recipes.training import override_flag

    flags = override_flag(flags, "--update-freq", update_freq)
    return flags + ["--distributed-world-size", str(gpus)] if gpus > 1 else flags


def configs() -> Dict[str, str]:
    """{file name: text} of every generated config."""
    from deepnet_recipes import iwslt14, opus100, wmt17
    from deepnet_recipes.paper import TABLE6_FIG7, TABLE8_LAYERS

    opus_meta = {"lang_pairs": ["???"], "trainonly_pairs": []}
    hydra_task_note = [
        "LIMITATION: fairseq-hydra-train only builds tasks with a dataclass config and translation_multi_simple_epoch",
        "is argparse-only, so it stops with 'Could not infer task type'. This file records the exact configuration;",
        "run it with scripts/opus100/train.sh, which passes the same values as fairseq-train flags (and fills",
        "lang_dict, lang_pairs and the train-only pairs itself).",
    ]
    run = ("fairseq-hydra-train --config-dir configs --config-name {} task.data=DATA "
           "common.user_dir=$PWD/deepnet_fairseq")
    specs: List[Tuple[str, List[str], Callable[[], List[str]]]] = [
        ("wmt17_en_de_deepnet.yaml",
         ["WMT-17 En-De, Table 1's DeepNet row at 100L-100L, hyperparameters of Table 5, on 8 GPUs.",
          run.format("wmt17_en_de_deepnet"), "= scripts/wmt17/train.sh deepnorm 100 100 8"],
         lambda: _bilingual(wmt17.recipe_flags("deepnorm", 100, 100), 8, 16)),
        ("wmt17_fig7_deepnet.yaml",
         ["WMT-17 En-De, Fig. 7's default point (Table 6): DeepNet 18L-18L, lr 5e-4, 128 x 4096, 512-2048-8.",
          "The grid (lr, batch, size) is scripts/wmt17/fig7.sh.", run.format("wmt17_fig7_deepnet")],
         lambda: _bilingual(wmt17.recipe_flags("deepnorm", 18, 18, TABLE6_FIG7), 8, 16)),
        ("iwslt14_de_en_deepnet.yaml",
         ["IWSLT-14 De-En, one point of Fig. 6: DeepNet 100L-100L, hyperparameters of Table 4, 1 GPU.",
          run.format("iwslt14_de_en_deepnet"), "= scripts/iwslt14/train.sh deepnorm 100 100 (sweep: sweep.sh)"],
         lambda: iwslt14.recipe_flags("deepnorm", 100, 100)),
        ("opus100_deepnet_200l.yaml",
         ["OPUS-100, Table 2's DeepNet 200 layers (100L-100L), hyperparameters of Table 7, 8 GPUs.",
          "= scripts/opus100/train.sh 200l 8", *hydra_task_note],
         lambda: _bilingual(opus100.recipe_flags(100, opus100.MODELS["200l"][1], Path("DATA"), opus_meta, "fsdp"),
                            8, 16)),
        ("opus100_deepnet_1000l.yaml",
         ["OPUS-100, Table 2's DeepNet 1000 layers (500L-500L), hyperparameters of Table 7, 8 GPUs.",
          "= scripts/opus100/train.sh 1000l 8 (FSDP needs fairscale; see docs/recipes.md)", *hydra_task_note],
         lambda: _bilingual(opus100.recipe_flags(500, opus100.MODELS["1000l"][1], Path("DATA"), opus_meta, "fsdp"),
                            8, 16)),
        ("table8_102lang_deepnet_200l.yaml",
         ["Table 3's 102-language DeepNet (100L-100L, 1024-4096-16), hyperparameters of Table 8, 8 GPUs.",
          "Its data (CCMatrix + CCAligned + OPUS + Tatoeba) is not built by these recipes.",
          "= scripts/opus100/train.sh table8 8 --data DIR", *hydra_task_note],
         lambda: _bilingual(opus100.recipe_flags(TABLE8_LAYERS, opus100.MODELS["table8"][1], Path("DATA"), opus_meta,
                                                 "fsdp"), 8, 32)),
    ]
    out = {}
    for name, header, make in specs:
        out[name] = render(name, header, make())
    return out


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepnet_recipes.configs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a file in configs/ differs; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for name, text in configs().items():
        path = CONFIG_DIR / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print("stale configs (regenerate with python -m deepnet_recipes.configs): " + ", ".join(stale),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
