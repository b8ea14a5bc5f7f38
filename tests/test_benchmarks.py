"""``benchmarks/run.py --smoke`` end to end: valid JSON with the expected keys and finite numbers.

Benchmarks are not tests: nothing here asserts a timing or a ratio, only that every benchmark runs
and writes well-formed results.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from conftest import REPO, run


def _finite(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    return True


def load_run_script():
    """benchmarks/run.py as a module, the way ``python benchmarks/run.py`` loads it (it puts the repository
    on sys.path itself)."""
    spec = importlib.util.spec_from_file_location("benchmarks_run_script", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_results(tmp_path: Path, capsys) -> None:
    """``benchmarks/run.py --smoke`` in this process (its memory and depth points still run in fresh
    subprocesses, as the benchmark requires)."""
    out = tmp_path / "results"
    assert load_run_script().main(["--smoke", "--out", str(out)]) == 0
    assert "# deepnet-fairseq benchmark summary" in capsys.readouterr().out

    expected = {"overhead.json", "depth.json", "paper_scale.json", "serve.json", "run.json", "summary.md",
                "depth_scaling.png"}
    assert expected <= {p.name for p in out.iterdir()}
    data = {name: json.loads((out / name).read_text()) for name in expected if name.endswith(".json")}
    for name, content in data.items():
        assert _finite(content), name

    overhead = data["overhead.json"]
    assert overhead["meta"]["smoke"] is True
    assert overhead["configs"]
    for config in overhead["configs"]:
        for key in ("train_step_time", "generation_time"):
            stats = config[key]
            assert {"ratio", "stock", "deepnorm", "per_pair_ratios"} <= set(stats)
            assert {"median", "q1", "q3", "min", "max", "n"} <= set(stats["ratio"])
            assert stats["stock"]["median"] > 0 and stats["deepnorm"]["median"] > 0
        assert {"training_delta", "peak_rss"} <= set(config["memory"])
        assert config["saved_activations"]["stock_mib"] > 0
        assert {"train_step_time", "generation_time", "memory_training_delta", "memory_saved_activations"} <= set(
            config["targets"]
        )
        assert config["generation_time"]["stock_sentences_per_s"] > 0

    depth = data["depth.json"]
    assert len(depth["points"]) == 2 * len({p["layers_per_side"] for p in depth["points"]})
    for point in depth["points"]:
        assert point["peak_rss_mib"] > 0 and point["time_per_update_s"]["median"] > 0
        assert point["losses_finite"]
    for key in ("plain", "checkpointed"):
        assert "r2" in depth["fits"][key]["time_vs_total_layers"]
    assert depth["deepest"]["finite_loss"] is True
    assert depth["checkpointing"]

    paper = data["paper_scale.json"]
    for model in paper["models"]:
        for variant in model["variants"]:
            assert variant["all_meta"] is True
            assert variant["params"] > variant["embedding_params"] > 0
            memory = variant["memory"]
            assert memory["states_fsdp8_gib"] * 8 == memory["states_unsharded_gib"]

    serve = data["serve.json"]
    assert [beam_run["beam"] for beam_run in serve["runs"]] == [1, 5]
    for beam_run in serve["runs"]:
        assert set(beam_run["engines"]) == {"fairseq", "ctranslate2_float32", "ctranslate2_int8"}
        for engine in beam_run["engines"].values():
            assert engine["sentences_per_s"] > 0 and 0 <= engine.get("identical_to_fairseq", 1.0) <= 1

    summary = (out / "summary.md").read_text()
    for heading in ("## 1. Overhead", "## 2. Depth scaling", "## 3. Paper-scale", "## Serving"):
        assert heading in summary


def test_gpu_script_exits_cleanly_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        return  # on a CUDA machine gpu.sh would run the real (long) benchmark
    proc = run(["bash", REPO / "benchmarks" / "gpu.sh"], cwd=REPO)
    assert "skipping GPU benchmarks" in proc.stdout
