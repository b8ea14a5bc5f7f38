"""``deepnet-export``: serve a deepnet model without the plugin.

Examples::

    deepnet-export --to fairseq checkpoints/checkpoint_best.pt model.pt
    deepnet-export --to ctranslate2 --data data-bin checkpoints/checkpoint_best.pt ct2_model
    deepnet-export --to ctranslate2 --data data-bin --quantization int8 checkpoints/checkpoint_best.pt ct2_int8

``--to fairseq`` writes a checkpoint of fairseq's own ``transformer`` architecture with DeepNorm's
alpha (or Admin's omega) folded into the weights (:mod:`deepnet_fairseq.export`): stock fairseq loads
it without ``--user-dir``, also on PyTorch >= 2.6 (the file holds only plain containers and tensors).
``--to ctranslate2`` runs CTranslate2's own fairseq converter on that checkpoint; ``--data`` is the
directory with the ``dict.<lang>.txt`` dictionaries the model was trained with.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

import deepnet_fairseq
from deepnet_fairseq.checkpoints import atomic_write, load_checkpoint
from deepnet_fairseq.export import ExportError, export_state

QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32")


def write_fairseq(source: os.PathLike, output: os.PathLike) -> Dict[str, Any]:
    """Export ``source`` (:func:`~deepnet_fairseq.export.export_state`) into ``output``, written atomically."""
    if Path(source).resolve() == Path(output).resolve():
        raise ExportError(f"output {output} is the input checkpoint; refusing to overwrite it")
    exported = export_state(load_checkpoint(source), source=os.fspath(source))
    atomic_write(output, lambda handle: torch.save(exported, handle))
    return exported


def converter_arguments(exported: Dict[str, Any]) -> argparse.Namespace:
    """The ``args`` CTranslate2's fairseq converter reads: the task section plus the model configuration."""
    cfg = exported["cfg"]
    task = dict(cfg.get("task") or {})
    name = task.pop("_name", None)
    merged = {**task, **cfg["model"]}
    if name is not None:
        merged["task"] = name
    merged.setdefault("arch", merged.get("_name"))  # a dataclass model's configuration names it in _name
    return argparse.Namespace(**merged)


def write_ctranslate2(
    source: os.PathLike,
    data_dir: os.PathLike,
    output_dir: os.PathLike,
    quantization: Optional[str] = None,
    source_lang: Optional[str] = None,
    target_lang: Optional[str] = None,
    force: bool = False,
) -> str:
    """Export ``source`` and convert it with ``ctranslate2.converters.FairseqConverter`` into ``output_dir``.

    The converter loads a checkpoint whose ``args`` is an ``argparse.Namespace`` (which this plugin's
    checkpoint allow-list lets ``torch.load(weights_only=True)`` read), so the exported state is
    handed to it through a temporary file in that form.
    """
    try:
        from ctranslate2.converters import FairseqConverter
    except ImportError:
        raise ExportError("--to ctranslate2 needs the ctranslate2 package: pip install ctranslate2") from None
    data = Path(data_dir)
    if not data.is_dir() or not any(data.glob("dict*.txt")):
        raise ExportError(f"--data {data_dir}: no dict.<lang>.txt (or dict.txt) dictionaries there (the "
                          "fairseq-preprocess output directory the model was trained with)")
    for flag, lang in (("--source-lang", source_lang), ("--target-lang", target_lang)):
        if lang is not None and not (data / f"dict.{lang}.txt").is_file():
            raise ExportError(f"{flag} {lang}: {data / f'dict.{lang}.txt'} does not exist")
    if os.path.exists(output_dir) and not force:
        raise ExportError(f"output directory {output_dir} already exists; pass --force to replace it")
    exported = export_state(load_checkpoint(source), source=os.fspath(source))
    converter_state = {**exported, "args": converter_arguments(exported)}
    with tempfile.TemporaryDirectory(prefix="deepnet-export-") as tmp:
        path = os.path.join(tmp, "exported.pt")
        torch.save(converter_state, path)
        converter = FairseqConverter(path, os.fspath(data), source_lang=source_lang, target_lang=target_lang)
        return converter.convert(os.fspath(output_dir), quantization=quantization, force=force)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", required=True, choices=("fairseq", "ctranslate2"), help="what to export to")
    parser.add_argument("checkpoint", help="a deepnet_transformer checkpoint (e.g. checkpoint_best.pt)")
    parser.add_argument("output", help="--to fairseq: the .pt file to write; --to ctranslate2: a directory")
    parser.add_argument("--data", help="--to ctranslate2: the data directory with the dict.<lang>.txt files")
    parser.add_argument("--quantization", choices=QUANTIZATIONS,
                        help="--to ctranslate2: weight type (default: float32)")
    parser.add_argument("--source-lang", help="--to ctranslate2: source language (default: the checkpoint's)")
    parser.add_argument("--target-lang", help="--to ctranslate2: target language (default: the checkpoint's)")
    parser.add_argument("--force", action="store_true", help="--to ctranslate2: replace an existing output directory")
    args = parser.parse_args(argv)

    if not Path(args.checkpoint).is_file():
        parser.error(f"checkpoint {args.checkpoint}: no such file")
    deepnet_fairseq.register()  # the checkpoint's --arch is looked up among the registered architectures
    ct2_only = {"--data": args.data, "--quantization": args.quantization, "--source-lang": args.source_lang,
                "--target-lang": args.target_lang, "--force": args.force or None}
    try:
        if args.to == "fairseq":
            given = [flag for flag, value in ct2_only.items() if value is not None]
            if given:
                parser.error(f"{', '.join(given)} only apply with --to ctranslate2")
            exported = write_fairseq(args.checkpoint, args.output)
            scheme = exported["extra_state"]["deepnet_export"]["scheme"]
            print(f"wrote {args.output}: fairseq transformer, from {scheme}")
        else:
            if args.data is None:
                parser.error("--to ctranslate2 needs --data DATA_DIR (the directory with dict.<lang>.txt)")
            write_ctranslate2(args.checkpoint, args.data, args.output, quantization=args.quantization,
                              source_lang=args.source_lang, target_lang=args.target_lang, force=args.force)
            print(f"wrote {args.output}: CTranslate2 model ({args.quantization or 'float32'} weights)")
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
