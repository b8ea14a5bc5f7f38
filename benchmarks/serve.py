"""Serving speed of a DeepNet translation model: ``fairseq-generate`` vs CTranslate2 fp32 vs int8.

    python benchmarks/serve.py                       # the demo's DeepNorm model (run `make demo` first)
    python benchmarks/serve.py --checkpoint ckpt.pt --data data-bin --references test.en
    python benchmarks/serve.py --smoke               # a 2-update toy model on generated data (< 1 min)

The checkpoint is exported with ``deepnet-export --to ctranslate2`` twice (float32 weights, and
``--quantization int8``).  Then, for every beam size, the same test sentences are translated by

* ``fairseq-generate --user-dir deepnet_fairseq`` on the DeepNet checkpoint, in a subprocess; its time
  is the one fairseq prints ("Translated N sentences ... in T s"), which covers generation only;
* ``ctranslate2.Translator.translate_batch`` on each exported model; the time covers that call only.

Every engine runs on one thread (``OMP_NUM_THREADS=1`` for fairseq, ``intra_threads=1`` for
CTranslate2), with the same beam, the same batch size in sentences and the same length limits
(fairseq ``--max-len-a 0 --max-len-b L --min-len 1`` = CTranslate2 ``max_decoding_length=L,
min_decoding_length=1``).  Reported per engine: sentences/s, speed-up over fairseq, the fraction of
hypotheses identical to fairseq's, and sacreBLEU against the raw references (hypotheses detokenized
as ``--remove-bpe sentencepiece`` does) when ``--references`` is given.  ``--repeats`` runs the engines
in interleaved rounds and reports the median time.  Results: ``benchmarks/results/serve.json``.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

DEMO = common.REPO / "runs" / "demo"
BIN = Path(sys.executable).parent  # the console scripts of this environment
ENGINES = ("fairseq", "ctranslate2_float32", "ctranslate2_int8")
TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s")


def demo_inputs() -> Dict[str, Any]:
    """The demo's DeepNorm checkpoint, data and raw references (``make demo`` writes them)."""
    inputs = {
        "checkpoint": DEMO / "deepnorm" / "checkpoints" / "checkpoint_last.pt",
        "data": DEMO / "data" / "bin",
        "references": DEMO / "data" / "text" / "test.en",
        "post_process": "sentencepiece",
    }
    missing = [str(p) for p in (inputs["checkpoint"], inputs["data"], inputs["references"]) if not p.exists()]
    if missing:
        raise SystemExit(f"benchmarks/serve.py: {', '.join(missing)} missing: run `make demo` first, or pass "
                         "--checkpoint/--data/--references")
    return inputs


def smoke_inputs(work: Path) -> Dict[str, Any]:
    """A toy copy-reversal corpus, binarized, and a 1L-1L DeepNorm checkpoint after 2 updates."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(30)]
    text = work / "text"
    text.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 64), ("test", 12)):
        lines = [[rng.choice(words) for _ in range(rng.randint(3, 8))] for _ in range(n)]
        (text / f"{split}.src").write_text("".join(" ".join(s) + "\n" for s in lines))
        (text / f"{split}.tgt").write_text("".join(" ".join(reversed(s)) + "\n" for s in lines))
    data = work / "bin"
    env = common.child_env()
    subprocess.run([str(BIN / "fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt",
                    "--joined-dictionary", "--trainpref", str(text / "train"), "--testpref", str(text / "test"),
                    "--destdir", str(data), "--workers", "1"], check=True, capture_output=True, env=env)
    subprocess.run([str(BIN / "fairseq-train"), str(data), "--user-dir", common.USER_DIR,
                    "--arch", "deepnet_transformer_tiny", "--deepnorm", "--encoder-layers", "1",
                    "--decoder-layers", "1", "--share-all-embeddings",
                    "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "400", "--max-update", "2", "--cpu",
                    "--num-workers", "0", "--disable-validation", "--no-epoch-checkpoints",
                    "--required-batch-size-multiple", "1", "--save-dir", str(work / "checkpoints")],
                   check=True, capture_output=True, env=env)
    return {"checkpoint": work / "checkpoints" / "checkpoint_last.pt", "data": data,
            "references": text / "test.tgt", "post_process": None}


def language_pair(checkpoint_state: Dict[str, Any], data: Path) -> Tuple[str, str]:
    """Source and target language of the checkpoint (or, if it stores none, of the data directory)."""
    from fairseq.data import data_utils

    task = checkpoint_state["cfg"]["task"]
    src, tgt = task.get("source_lang"), task.get("target_lang")
    if src is None or tgt is None:
        src, tgt = data_utils.infer_language_pair(str(data))
    return src, tgt


def read_sources(data: Path, subset: str, src: str, tgt: str) -> List[List[str]]:
    """The binarized source sentences of ``subset`` as dictionary symbols (without the final ``</s>``)."""
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(str(data / f"dict.{src}.txt"))
    dataset = data_utils.load_indexed_dataset(str(data / f"{subset}.{src}-{tgt}.{src}"), dictionary)
    if dataset is None:
        raise SystemExit(f"benchmarks/serve.py: no {subset}.{src}-{tgt}.{src} in {data}")
    return [[dictionary[int(t)] for t in dataset[i][:-1]] for i in range(len(dataset))]


def run_fairseq(checkpoint: Path, data: Path, src: str, tgt: str, subset: str, beam: int, batch: int,
                max_len: int) -> Tuple[Dict[int, List[str]], float]:
    """``fairseq-generate --user-dir`` on the DeepNet checkpoint: ({id: hypothesis tokens}, seconds)."""
    proc = subprocess.run(
        [str(BIN / "fairseq-generate"), str(data), "--user-dir", common.USER_DIR, "--path", str(checkpoint), "--cpu",
         "--source-lang", src, "--target-lang", tgt, "--gen-subset", subset, "--beam", str(beam),
         "--batch-size", str(batch), "--required-batch-size-multiple", "1", "--max-len-a", "0",
         "--max-len-b", str(max_len), "--min-len", "1", "--num-workers", "0"],
        capture_output=True, text=True, env=common.child_env(),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"fairseq-generate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    hypotheses = {}
    for line in proc.stdout.splitlines():
        head, _, rest = line.partition("\t")
        if head.startswith("H-"):
            fields = rest.split("\t")
            hypotheses[int(head[2:])] = fields[1].split() if len(fields) > 1 else []
    match = TRANSLATED.search(proc.stdout + proc.stderr)
    if match is None:
        raise RuntimeError("fairseq-generate printed no 'Translated N sentences ... in T s' line")
    return hypotheses, float(match.group(3))


def run_ctranslate2(model_dir: Path, sources: List[List[str]], beam: int, batch: int,
                    max_len: int) -> Tuple[Dict[int, List[str]], float]:
    """``Translator.translate_batch`` on one thread: ({id: hypothesis tokens}, seconds of that call)."""
    import ctranslate2

    translator = ctranslate2.Translator(str(model_dir), device="cpu", inter_threads=1, intra_threads=1)
    start = time.perf_counter()
    results = translator.translate_batch(sources, beam_size=beam, max_batch_size=batch, max_decoding_length=max_len,
                                         min_decoding_length=1)
    seconds = time.perf_counter() - start
    return {i: r.hypotheses[0] for i, r in enumerate(results)}, seconds


def bleu(hypotheses: Dict[int, List[str]], references: List[str], post_process: Optional[str]) -> Dict[str, Any]:
    """sacreBLEU of the hypotheses (in corpus order, detokenized like ``--remove-bpe``) against the raw references."""
    import sacrebleu
    from fairseq.data.data_utils import post_process as remove_bpe

    texts = [" ".join(hypotheses[i]) for i in range(len(references))]
    if post_process:
        texts = [remove_bpe(t, post_process) for t in texts]
    metric = sacrebleu.BLEU()
    return {"bleu": metric.corpus_score(texts, [references]).score, "signature": str(metric.get_signature())}


def directory_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def benchmark(checkpoint: Path, data: Path, work: Path, references: Optional[Path] = None,
              post_process: Optional[str] = None, beams: Sequence[int] = (1, 5), batch_size: int = 64,
              max_len: int = 64, repeats: int = 1, subset: str = "test") -> Dict[str, Any]:
    """Export ``checkpoint`` to CTranslate2 (fp32, int8) and time all three engines on ``subset``."""
    from deepnet_fairseq.checkpoints import load_checkpoint
    from deepnet_fairseq.cli.export import write_ctranslate2
    from deepnet_fairseq.scheme_record import describe, record_from_model_config

    state = load_checkpoint(checkpoint)
    src, tgt = language_pair(state, data)
    sources = read_sources(data, subset, src, tgt)
    reference_lines = references.read_text(encoding="utf-8").splitlines() if references else None
    if reference_lines is not None and len(reference_lines) != len(sources):
        raise SystemExit(f"benchmarks/serve.py: {references} has {len(reference_lines)} lines, the {subset} set "
                         f"{len(sources)} sentences")
    models = {}
    with common.quiet_logging():
        for kind in ("float32", "int8"):
            models[kind] = work / f"ct2_{kind}"
            common.log(f"deepnet-export --to ctranslate2 ({kind}) -> {models[kind]}")
            write_ctranslate2(checkpoint, data, models[kind], quantization=kind, force=True)
    model_cfg = state["cfg"]["model"]
    runs = []
    for beam in beams:
        seconds: Dict[str, List[float]] = {engine: [] for engine in ENGINES}
        hypotheses: Dict[str, Dict[int, List[str]]] = {}
        for round_ in range(repeats):
            common.log(f"beam {beam}, round {round_ + 1}/{repeats}: {len(sources)} sentences")
            hypotheses["fairseq"], t = run_fairseq(checkpoint, data, src, tgt, subset, beam, batch_size, max_len)
            seconds["fairseq"].append(t)
            for kind in ("float32", "int8"):
                engine = f"ctranslate2_{kind}"
                hypotheses[engine], t = run_ctranslate2(models[kind], sources, beam, batch_size, max_len)
                seconds[engine].append(t)
        if sorted(hypotheses["fairseq"]) != list(range(len(sources))):
            raise RuntimeError(f"fairseq-generate translated {len(hypotheses['fairseq'])} of {len(sources)} sentences")
        engines = {}
        for engine in ENGINES:
            median = statistics.median(seconds[engine])
            same = sum(hypotheses[engine][i] == hypotheses["fairseq"][i] for i in range(len(sources)))
            engines[engine] = {
                "seconds": seconds[engine],
                "median_seconds": median,
                "sentences_per_s": len(sources) / median,
                "identical_to_fairseq": same / len(sources),
                **(bleu(hypotheses[engine], reference_lines, post_process) if reference_lines else {}),
            }
        fairseq_rate = engines["fairseq"]["sentences_per_s"]
        runs.append({
            "beam": beam,
            "engines": engines,
            "speedup_over_fairseq": {e: engines[e]["sentences_per_s"] / fairseq_rate for e in ENGINES[1:]},
        })
    return {
        "model": {
            "checkpoint": str(checkpoint),
            "arch": model_cfg.arch if hasattr(model_cfg, "arch") else model_cfg.get("arch"),
            "residual_scheme": describe(record_from_model_config(model_cfg)),
            "updates": int(state["optimizer_history"][-1].get("num_updates", 0)),
            # tied tables (--share-all-embeddings) are one tensor under several keys: count storages once
            "parameters": sum({t.data_ptr(): t.numel() for k, t in state["model"].items()
                               if not k.endswith("version")}.values()),
        },
        "test_set": {"data": str(data), "subset": subset, "sentences": len(sources), "pair": f"{src}-{tgt}",
                     "references": str(references) if references else None},
        "settings": {"batch_size_sentences": batch_size, "max_len": max_len, "min_len": 1, "repeats": repeats,
                     "threads_per_engine": 1},
        "model_size_mib": {"fairseq_checkpoint": checkpoint.stat().st_size / 2**20,
                           **{f"ctranslate2_{k}": directory_mib(p) for k, p in models.items()}},
        "runs": runs,
    }


def summary_lines(result: Dict[str, Any]) -> List[str]:
    """Markdown table of one :func:`benchmark` result (for ``benchmarks/run.py``'s summary)."""
    m, t = result["model"], result["test_set"]
    lines = [
        "## Serving: fairseq-generate vs CTranslate2 (one CPU thread each)",
        "",
        f"`{m['arch']}`, {m['residual_scheme']}, {m['parameters'] / 1e6:.2f}M parameters, {m['updates']} updates; "
        f"{t['sentences']} {t['pair']} {t['subset']} sentences, batch {result['settings']['batch_size_sentences']} "
        f"sentences, max length {result['settings']['max_len']}.",
        "",
        "| beam | engine | sentences/s | speed-up | identical to fairseq | BLEU |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        for engine, stats in run["engines"].items():
            speedup = run["speedup_over_fairseq"].get(engine, 1.0)
            score = f"{stats['bleu']:.2f}" if "bleu" in stats else "-"
            lines.append(f"| {run['beam']} | {engine} | {stats['sentences_per_s']:.1f} | {speedup:.2f}x "
                         f"| {stats['identical_to_fairseq']:.1%} | {score} |")
    return lines + [""]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a 2-update toy model on generated data")
    parser.add_argument("--checkpoint", type=Path, help="DeepNet checkpoint (default: the demo's DeepNorm model)")
    parser.add_argument("--data", type=Path, help="its fairseq-preprocess directory (dictionaries, test set)")
    parser.add_argument("--references", type=Path, help="raw reference text of the test set, for sacreBLEU")
    parser.add_argument("--post-process", help="--remove-bpe scheme of the hypotheses (e.g. sentencepiece)")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work", type=Path, default=common.REPO / "runs" / "serve_bench")
    parser.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results" / "serve.json")
    a = parser.parse_args(argv)
    for flag in ("batch_size", "max_len", "repeats"):
        if getattr(a, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if any(beam < 1 for beam in a.beams):
        parser.error("--beams must be >= 1")

    common.single_thread()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.smoke:
        inputs = smoke_inputs(a.work / "smoke")
    elif a.checkpoint is None:
        inputs = demo_inputs()
    else:
        if a.data is None:
            parser.error("--checkpoint needs --data")
        inputs = {"checkpoint": a.checkpoint, "data": a.data, "references": a.references,
                  "post_process": a.post_process}
    started = time.perf_counter()
    result = benchmark(work=a.work, beams=a.beams, batch_size=a.batch_size, max_len=a.max_len, repeats=a.repeats,
                       **inputs)
    meta = {"command": "python benchmarks/serve.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "smoke": a.smoke, "environment": common.environment(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_s": time.perf_counter() - started}
    common.write_json(a.out, {"meta": meta, **result})
    print("\n".join(summary_lines(result)))
    common.log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
