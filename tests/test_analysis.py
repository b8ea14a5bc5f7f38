"""deepnet-analyze and deepnet-sweep on a minimal grid: they run and write CSV + PNG."""

from __future__ import annotations

import csv
import shutil

import pytest

from conftest import cli, run
from deepnet_fairseq.cli.analyze import main as analyze_main
from deepnet_fairseq.cli.sweep import main as sweep_main
from deepnet_fairseq.cli.sweep import table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_analyze_writes_csv_and_png(tiny_data, tmp_path):
    out = tmp_path / "analysis"
    run([cli("deepnet-analyze"), "all", "--data", tiny_data, "--depths", "2", "4", "--layers", "3",
         "--updates", "4", "--every", "2", "--out", out, "--threads", "1"])
    fig5 = _rows(out / "fig5_model_update.csv")
    assert {(r["scheme"], r["layers"]) for r in fig5} == {(s, d) for s in ("post-ln", "deepnorm") for d in ("2", "4")}
    assert all(float(r["model_update"]) == 0.0 for r in fig5 if r["update"] == "0")  # theta_0 is the reference
    assert all(float(r["model_update"]) > 0.0 for r in fig5 if r["update"] == "3")
    fig34 = _rows(out / "fig3_4_gradients_ln.csv")
    assert {r["scheme"] for r in fig34} == {"post-ln", "post-ln-init", "deepnorm"}
    assert {r["update"] for r in fig34} == {"0", "2"}
    assert len({(r["side"], r["layer"]) for r in fig34}) == 6
    assert all(float(r["grad_norm"]) > 0 and float(r["ln_input_norm"]) > 0 for r in fig34)
    for name in ("fig5_model_update.png", "fig3_4_gradients_ln.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_analyze_rejects_bad_arguments(tmp_path, capsys):
    """deepnet-analyze's main in this process (its console script runs above)."""
    with pytest.raises(SystemExit) as exit_:
        analyze_main(["fig5", "--depths", "0", "--data", str(tmp_path)])
    assert exit_.value.code == 2 and "--depths" in capsys.readouterr().err


def test_sweep_minimal_grid_is_resumable(tiny_data, tmp_path, capsys):
    """The deepnet-sweep console script, then its main again in this process: nothing is retrained."""
    data = tmp_path / "data" / "bin"
    shutil.copytree(tiny_data, data)
    (tmp_path / "data" / "text").mkdir()
    shutil.copy(tiny_data.parent / "test.tgt", tmp_path / "data" / "text" / "test.en")
    out = tmp_path / "sweep"
    args = ["--data", str(data), "--out", str(out), "--schemes", "post-ln", "deepnorm", "--depths", "2",
            "--updates", "6", "--warmup", "2", "--max-tokens", "500", "--dim", "16"]
    first = run([cli("deepnet-sweep"), *args])
    results = _rows(out / "results.csv")
    assert [r["scheme"] for r in results] == ["post-ln", "deepnorm"]
    assert all(r["bleu"] != "" and float(r["bleu"]) >= 0 for r in results)
    assert (out / "bleu_vs_depth.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "deepnorm_2L" / "train.log").exists()
    assert "| deepnorm |" in (out / "table.md").read_text()
    assert "post-ln" in first.stdout
    capsys.readouterr()
    assert sweep_main(args) == 0  # resumable: nothing is retrained
    again = capsys.readouterr().out
    assert "valid loss" not in again and "| deepnorm |" in again


def test_sweep_table_marks_diverged_runs():
    results = [
        {"scheme": "post-ln", "layers": 6, "diverged": False, "bleu": 3.21, "final_valid_loss": 6.5},
        {"scheme": "post-ln", "layers": 24, "diverged": True, "bleu": None, "final_valid_loss": None},
    ]
    markdown = table(results, ["post-ln"], [6, 24])
    assert markdown.splitlines()[2] == "| post-ln | 3.21 (6.50) | diverged |"


@pytest.mark.parametrize("flag", [["--updates", "0"], ["--depths", "-1"]])
def test_sweep_rejects_bad_arguments(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        sweep_main(flag)
    assert exit_.value.code == 2 and flag[0] in capsys.readouterr().err
