"""The paper recipes (scripts/wmt17, scripts/iwslt14, scripts/opus100, scripts/collect_results.py) end to end
on tiny generated archives with the real download layouts: prepare -> 2 updates of a 2L-2L model with the
recipe's flags -> evaluate -> a BLEU number; plus dry runs, resumption, checksum and argument errors.

Each recipe's prepared data is a module fixture built once per test session in a directory shared by the
xdist workers, under a file lock (whichever worker comes first prepares; the others wait, and re-running
prepare.sh on finished data only skips its stamped steps), so the tests need no xdist group and spread over
both workers. fairseq loading the binarized data is shown by the train and evaluate runs on it.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from recipe_fixtures import make_iwslt14, make_opus100, make_wmt17, write_checksums

from conftest import BIN, REPO

SCRIPTS = REPO / "scripts"
TINY = ["--cpu", "--embed-dim", "32", "--ffn-dim", "64", "--heads", "2", "--max-update", "2",
        "--max-tokens", "400", "--log-interval", "1"]


def sh(script: str, *args, checksums: Path | None = None, check: bool = True, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHON=sys.executable, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("DEEPNET_RECIPE_CHECKSUMS", None)
    if checksums is not None:
        env["DEEPNET_RECIPE_CHECKSUMS"] = str(checksums)
    env.update(env_extra or {})
    proc = subprocess.run(["bash", str(SCRIPTS / script), *map(str, args)], env=env, capture_output=True,
                          text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def shared_dir(tmp_path_factory, name: str):
    """(directory shared by all xdist workers of this session, an exclusive flock held on it)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root = base / f"recipe-{name}"
    root.mkdir(parents=True, exist_ok=True)
    lock = open(root / ".lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return root, lock


def bleu_of(run: Path) -> dict:
    result = json.loads((run / "eval" / "bleu.json").read_text())
    assert isinstance(result["bleu"], float) and 0.0 <= result["bleu"] <= 100.0
    return result


# ---- WMT-17 ---------------------------------------------------------------------------------------
def prepared(tmp_path_factory, recipe: str, make_archives) -> dict:
    """``recipe``'s prepare.sh run on generated archives, once per session (the first worker prepares; under
    the flock the others re-run it on finished data, which only skips its stamped steps)."""
    root, lock = shared_dir(tmp_path_factory, recipe)
    sums = root / "checksums.sha256"
    if not sums.exists():
        write_checksums(make_archives(root / "archives"), sums)
    out = root / "prep"
    first = sh(f"{recipe}/prepare.sh", "--data-dir", root / "archives", "--out-dir", out, "--vocab-size", 300,
               "--workers", 1, checksums=sums)
    lock.close()  # releases the flock
    return {"root": root, "sums": sums, "out": out, "first": first}


@pytest.fixture(scope="module")
def wmt(tmp_path_factory):
    return prepared(tmp_path_factory, "wmt17", make_wmt17)


class TestWmt17:
    def test_prepare_output_and_resume(self, wmt):
        out = wmt["out"]
        for split in ("train", "valid", "test"):
            assert (out / "bin" / f"{split}.en-de.en.bin").exists()
        assert (out / "bin" / "dict.en.txt").read_text() == (out / "bin" / "dict.de.txt").read_text()
        # every 100th training pair is valid; newstest2014 (12 segments) is test
        assert len((out / "text" / "test.raw.de").read_text().splitlines()) == 12
        assert "@-@" in (out / "text" / "test.tok.de").read_text()  # tokenizer.perl -a style hyphens
        again = sh("wmt17/prepare.sh", "--data-dir", wmt["root"] / "archives", "--out-dir", out, "--vocab-size",
                   300, "--workers", 1, checksums=wmt["sums"])
        assert "binarize" in again.stdout and "skip binarize (done" in again.stdout
        assert "fairseq-preprocess" not in again.stdout.replace("skip", "")

    def test_train_and_evaluate(self, wmt):
        run = wmt["root"] / "run"
        sh("wmt17/train.sh", "deepnorm", 2, 2, 1, 1, *TINY, "--data", wmt["out"] / "bin", "--save-dir", run)
        assert (run / "status").read_text().strip() == "finished"
        info = json.loads((run / "run.json").read_text())
        for flag in ("--lr 1.5e-3", "--warmup-updates 4000", "--warmup-init-lr 1e-7", "--dropout 0.4",
                     "--weight-decay 1e-4", "--label-smoothing 0.1", "--share-all-embeddings",
                     "--residual-scheme deepnorm", "--encoder-layers 2"):
            assert flag in info["command"], flag
        again = sh("wmt17/train.sh", "deepnorm", 2, 2, 1, 1, *TINY, "--data", wmt["out"] / "bin", "--save-dir", run)
        assert "already finished" in again.stdout
        sh("wmt17/evaluate.sh", run, "--cpu", "--max-len-b", 8)
        result = bleu_of(run)
        assert "compound-split" in result["tok_bleu_kind"]
        assert result["signature"].startswith("nrefs:1|case:mixed") and "tok:13a" in result["signature"]

    def test_dry_run_gpu_command(self, wmt, tmp_path):
        proc = sh("wmt17/train.sh", "rezero", 100, 100, 8, "--dry-run", "--save-dir", tmp_path / "r")
        out = proc.stdout
        assert "--update-freq 16" in out and "--max-tokens 4096" in out  # 8 GPUs x 4096 x 16 = 128 x 4096
        assert "--distributed-world-size 8" in out and "--fp16" in out and "--allow-rezero-fp16" in out
        assert "--stop-on-divergence-patience" in out
        assert "--update-freq 128" in sh("wmt17/train.sh", "deepnorm", 6, 6, 1, "--dry-run").stdout
        prep = sh("wmt17/prepare.sh", "--dry-run", "--out-dir", tmp_path / "p").stdout
        assert "training-parallel-nc-v12.tgz" in prep and "fairseq-preprocess" in prep and "--joined-dictionary" in prep
        ev = sh("wmt17/evaluate.sh", tmp_path / "r", "--dry-run").stdout
        assert "--num-epoch-checkpoints 10" in ev and "--beam 4" in ev and "--lenpen 0.6" in ev

    def test_checksum_mismatch_and_bad_arguments(self, wmt, tmp_path):
        bad = tmp_path / "bad.sha256"
        bad.write_text(wmt["sums"].read_text().replace("training-parallel-nc-v12", "x")
                       + "0" * 64 + "  training-parallel-nc-v12.tgz\n")
        proc = sh("wmt17/prepare.sh", "--data-dir", wmt["root"] / "archives", "--out-dir", tmp_path / "o",
                  "--vocab-size", 300, checksums=bad, check=False)
        assert proc.returncode == 4 and "checksum mismatch for training-parallel-nc-v12.tgz" in proc.stderr
        proc = sh("wmt17/prepare.sh", "--data-dir", tmp_path / "empty-missing", check=False)
        assert proc.returncode == 2 and "not a directory" in proc.stderr
        (tmp_path / "empty").mkdir()
        proc = sh("wmt17/prepare.sh", "--data-dir", tmp_path / "empty", "--out-dir", tmp_path / "o2",
                  checksums=wmt["sums"], check=False)
        assert proc.returncode != 0 and "is not in --data-dir" in proc.stderr
        proc = sh("wmt17/train.sh", "deepnorm", 0, 6, check=False)
        assert proc.returncode == 2 and "positive" in proc.stderr
        proc = sh("wmt17/train.sh", "deepnorm", 6, 6, 8, "many", check=False)
        assert proc.returncode == 2 and "update-freq" in proc.stderr
        proc = sh("wmt17/train.sh", "deepnorm", 6, 6, 1, 1, "--data", tmp_path, "--save-dir", tmp_path / "x",
                  check=False)
        assert proc.returncode == 2 and "prepare.sh first" in proc.stderr
        proc = sh("wmt17/prepare.sh", "--out-dir", tmp_path / "o3", check=False,
                  env_extra={"PATH": "/usr/bin:/bin"})
        assert proc.returncode == 5 and "missing tools" in proc.stderr


# ---- IWSLT-14 -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def iwslt(tmp_path_factory):
    return prepared(tmp_path_factory, "iwslt14", make_iwslt14)


class TestIwslt14:
    def test_prepare(self, iwslt):
        text = iwslt["out"] / "text"
        train = (text / "train.raw.en").read_text()
        assert "<url>" not in train and "<talkid>" not in train and "Jane Doe" not in train
        assert len((text / "test.raw.en").read_text().splitlines()) == 15  # 5 XML test sets x 3 segments
        assert (text / "test.tok.en").read_text() == (text / "test.tok.en").read_text().lower()

    def test_sweep_train_evaluate_resume(self, iwslt):
        sweep = iwslt["root"] / "sweep"
        args = ["--schemes", "deepnorm", "--depths", "2", "--out", sweep, "--data", iwslt["out"] / "bin",
                "--update-freq", "1", *TINY, "--max-len-b", 8]
        sh("iwslt14/sweep.sh", *args)
        run = sweep / "deepnorm-2L-2L"
        assert (run / "status").read_text().strip() == "finished"
        assert "--max-update 2" in json.loads((run / "run.json").read_text())["command"]
        bleu_of(run)
        assert "deepnorm" in (sweep / "results.md").read_text()
        again = sh("iwslt14/sweep.sh", *args)
        assert "already finished" in again.stdout and "skip bleu" in again.stdout

    def test_sweep_dry_run(self, tmp_path):
        out = sh("iwslt14/sweep.sh", "--dry-run", "--out", tmp_path).stdout
        trains = [line for line in out.splitlines() if " train " in line]
        assert len(trains) == 10 * 10  # 10 schemes x 10L-10L..100L-100L
        assert " train rezero 100 100 " in out
        gpu = sh("iwslt14/train.sh", "deepnorm", 50, 50, "--dry-run", "--save-dir", tmp_path / "r").stdout
        assert "--max-update 8000" in gpu and "--fp16" in gpu and "--stop-on-divergence-patience" in gpu
        rezero = sh("iwslt14/train.sh", "rezero", 50, 50, "--dry-run", "--save-dir", tmp_path / "z").stdout
        assert "--fp16" not in rezero  # Fig. 6: mixed precision except ReZero


# ---- OPUS-100 -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def opus(tmp_path_factory):
    return prepared(tmp_path_factory, "opus100", make_opus100)


class TestOpus100:
    def test_prepare(self, opus):
        meta = json.loads((opus["out"] / "bin" / "recipe.json").read_text())
        assert meta["lang_pairs"] == ["fr-en", "en-fr"]  # the release names this pair en-fr
        assert meta["trainonly_pairs"] == ["an-en", "en-an"]  # no dev/test in the release
        assert (opus["out"] / "bin" / "train.an-en.an.bin").exists()

    def test_train_and_evaluate(self, opus):
        run = opus["root"] / "run"
        sh("opus100/train.sh", "200l", 1, 1, "--layers", 2, *TINY, "--data", opus["out"] / "bin", "--save-dir", run)
        command = json.loads((run / "run.json").read_text())["command"]
        for flag in ("translation_multi_simple_epoch", "--encoder-langtok src", "--decoder-langtok",
                     "--checkpoint-activations", "--residual-scheme deepnorm", "--extra-lang-pairs"):
            assert flag in command, flag
        sh("opus100/evaluate.sh", run, "--cpu", "--directions", "fr-en", "--max-len-b", 8)
        result = bleu_of(run)
        assert set(result["directions"]) == {"fr-en"} and result["x_en"] == result["bleu"]
        assert "case:mixed" in result["signature"]

    def test_dry_run_fsdp(self, opus, tmp_path):
        out = sh("opus100/train.sh", "1000l", 8, "--data", opus["out"] / "bin", "--dry-run",
                 "--save-dir", tmp_path).stdout
        for flag in ("--encoder-layers 500", "--decoder-layers 500", "--ddp-backend fully_sharded",
                     "--checkpoint-activations", "--fp16", "--distributed-world-size 8", "--update-freq 16",
                     "--max-epoch 4"):
            assert flag in out, flag


# ---- collect_results ------------------------------------------------------------------------------
def _fake_run(grid: Path, scheme: str, depth: int, exit_code: int, losses, bleu=None, simple=False) -> None:
    run = grid / f"{scheme}-{depth}L-{depth}L"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"scheme": scheme, "encoder_layers": depth, "decoder_layers": depth}))
    lines = []
    for i, loss in enumerate(losses, start=1):
        if simple:
            lines.append(f"2024-01-01 | INFO | train_inner | epoch 001: {i} / 9 loss={loss}, nll_loss=1, "
                         f"num_updates={i}")
        else:
            lines.append(f'2024-01-01 | INFO | train_inner | {{"epoch": 1, "update": {i}, "loss": "{loss}", '
                         f'"num_updates": "{i}"}}')
    (run / "train.log").write_text("\n".join(lines) + "\n")
    (run / "exit_code").write_text(f"{exit_code}\n")
    if bleu is not None:
        (run / "eval").mkdir()
        (run / "eval" / "bleu.json").write_text(json.dumps({"bleu": bleu, "sacrebleu": bleu - 1.0}))


def test_collect_results_table(tmp_path):
    grid = tmp_path / "grid"
    _fake_run(grid, "deepnorm", 6, 0, [9.0, 5.0, 4.0], bleu=27.81)
    _fake_run(grid, "deepnorm", 100, 0, [9.0, 4.5, 3.9], bleu=28.9, simple=True)
    _fake_run(grid, "post-ln", 6, 0, [9.0, 5.0, 4.2], bleu=28.05)
    _fake_run(grid, "post-ln", 100, 3, [9.0, 11.0])  # --stop-on-divergence-patience exit
    _fake_run(grid, "rezero", 18, 0, [9.0, 4.0, 12.5], bleu=1.0)  # loss blew up
    _fake_run(grid, "pre-ln", 18, 0, [9.0, "nan"])  # NaN loss
    csv_path, md_path = tmp_path / "t.csv", tmp_path / "t.md"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "collect_results.py"), grid, "--recipe", "wmt17",
                           "--csv", csv_path, "--markdown", md_path], capture_output=True, text=True, check=True)
    md = proc.stdout
    assert md.strip() == md_path.read_text().strip()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "| 27.8 (27.8*) |" in rows["DeepNet"] and "28.9 (28.9) |" in rows["DeepNet"]
    assert "diverged (diverged*)" in rows["Vanilla Post-LN"] and "28.1 (28.1*)" in rows["Vanilla Post-LN"]
    assert "diverged (diverged*)" in rows["ReZero"]
    assert "diverged (28.0*)" in rows["Vanilla Pre-LN"]
    header = md.splitlines()[0]
    assert header.split("|")[2:6] == [" 6L-6L ", " 18L-18L ", " 50L-50L ", " 100L-100L "]
    csv_rows = {(r.split(",")[0], r.split(",")[1]): r for r in csv_path.read_text().splitlines()[1:]}
    assert csv_rows[("post-ln", "100L-100L")].startswith("post-ln,100L-100L,diverged,,,diverged,no,exit code 3")
    assert csv_rows[("deepnorm", "100L-100L")].startswith("deepnorm,100L-100L,ok,28.9,27.9,28.9,yes")
    assert "loss blew up" in csv_rows[("rezero", "18L-18L")]
    assert csv_rows[("dlcl", "6L-6L")].startswith("dlcl,6L-6L,not run,,,27.4,no")
