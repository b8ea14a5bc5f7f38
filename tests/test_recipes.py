"""The paper recipes (scripts/wmt17, scripts/iwslt14, scripts/opus100, scripts/collect_results.py) end to end
on tiny generated archives with the real download layouts: prepare -> 2 updates of a 2L-2L model with the
recipe's flags -> evaluate -> a BLEU number; plus dry runs, resumption, checksum and argument errors.

Each recipe's prepared data is a module fixture built once per test session in a directory shared by the
xdist workers, under a file lock (whichever worker comes first prepares; the others wait, and re-running
prepare.sh on finished data only skips its stamped steps), so the tests need no xdist group and spread over
both workers. fairseq loading the binarized data is shown by the train and evaluate runs on it.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
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
                     "--weight-decay 1e-4", "--label-smoothing 0.1", "--adam-eps 1e-8", "--clip-norm 0.0",
                     "--share-all-embeddings", "--residual-scheme deepnorm", "--encoder-layers 2"):
            assert flag in info["command"], flag
        again = sh("wmt17/train.sh", "deepnorm", 2, 2, 1, 1, *TINY, "--data", wmt["out"] / "bin", "--save-dir", run)
        assert "already finished" in again.stdout
        sh("wmt17/evaluate.sh", run, "--cpu", "--max-len-b", 8)
        result = bleu_of(run)
        # the primary number is fairseq-generate's own --remove-bpe BLEU line; compound splitting is an extra
        assert result["primary"] == "fairseq_bleu" and result["bleu"] == result["fairseq_bleu"]
        assert "BLEU4 = " in result["fairseq_bleu_line"]
        assert "extra" in result["compound_split_bleu_kind"] and "tok_bleu" in result
        assert result["signature"].startswith("nrefs:1|case:mixed") and "tok:13a" in result["signature"]

    def test_dry_run_gpu_command(self, wmt, tmp_path):
        proc = sh("wmt17/train.sh", "rezero", 100, 100, 8, "--dry-run", "--save-dir", tmp_path / "r")
        out = proc.stdout
        assert "--update-freq 16" in out and "--max-tokens 4096" in out  # 8 GPUs x 4096 x 16 = 128 x 4096
        assert "--distributed-world-size 8" in out and "--fp16" in out and "--allow-rezero-fp16" in out
        assert "--stop-on-divergence-patience" in out
        assert "--lr 5e-4" in out  # Table 5: the No-LN schemes
        deepnorm = sh("wmt17/train.sh", "deepnorm", 6, 6, 1, "--dry-run").stdout
        assert "--update-freq 128" in deepnorm and "--lr 1.5e-3" in deepnorm
        prep = sh("wmt17/prepare.sh", "--dry-run", "--out-dir", tmp_path / "p").stdout
        assert "training-parallel-nc-v12.tgz" in prep and "fairseq-preprocess" in prep and "--joined-dictionary" in prep
        ev = sh("wmt17/evaluate.sh", tmp_path / "r", "--dry-run").stdout
        assert "--num-epoch-checkpoints 10" in ev and "--beam 4" in ev and "--lenpen 0.6" in ev
        assert "--primary fairseq_bleu" in ev

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
        # fairseq's prepare-iwslt14.sh drops only the <url>/<talkid>/<keywords> lines and strips the
        # <title>/<description> tags; <speaker>/<reviewer>/<translator> lines stay (its IWSLT-17 script drops them)
        assert "<url>" not in train and "<talkid>" not in train and "<keywords>" not in train
        assert "<title>" not in train and "Talk title en" in train and "<speaker>Jane Doe</speaker>" in train
        assert len((text / "test.raw.en").read_text().splitlines()) == 15  # 5 XML test sets x 3 segments
        assert (text / "test.tok.en").read_text() == (text / "test.tok.en").read_text().lower()
        assert "&quot;" in (text / "train.tok.en").read_text()  # tokenizer.perl escapes by default

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
        # Table 4: 512 / 2048 / 8, dropout 0.4, 4000 tokens per update
        for flag in ("--encoder-ffn-embed-dim 2048", "--decoder-attention-heads 8", "--dropout 0.4",
                     "--max-tokens 4000", "--update-freq 1", "--lr 5e-4", "--weight-decay 1e-4"):
            assert flag in gpu, flag
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
        # the train-only pairs get language tokens too (fairseq fills only langtoks["main"] by itself)
        settings = [line for line in (run / "train.log").read_text().splitlines() if "langtoks settings" in line]
        assert settings and "'trainonly': ['src', 'tgt']" in settings[0]
        sh("opus100/evaluate.sh", run, "--cpu", "--directions", "fr-en", "--max-len-b", 8)
        result = bleu_of(run)
        assert set(result["directions"]) == {"fr-en"} and result["x_en"] == result["bleu"]
        assert "case:mixed" in result["signature"]

    def test_dry_run_fsdp(self, opus, tmp_path):
        out = sh("opus100/train.sh", "1000l", 8, "--data", opus["out"] / "bin", "--dry-run",
                 "--save-dir", tmp_path).stdout
        for flag in ("--encoder-layers 500", "--decoder-layers 500", "--ddp-backend fully_sharded",
                     "--checkpoint-activations", "--fp16", "--distributed-world-size 8", "--update-freq 16",
                     "--max-epoch 4", "--lr 5e-4", "--dropout 0.1", "--weight-decay 0.0", "--adam-eps 1e-8",
                     "--langtoks"):
            assert flag in out, flag
        assert "fp16 + Adam training state 59 GB" in out  # 3.71B parameters x 16 bytes
        t8 = sh("opus100/train.sh", "table8", 8, "--data", opus["out"] / "bin", "--dry-run", "--save-dir",
                tmp_path / "t8").stdout
        for flag in ("--encoder-layers 100", "--encoder-embed-dim 1024", "--decoder-ffn-embed-dim 4096",
                     "--encoder-attention-heads 16", "--dropout 0.1", "--warmup-updates 6000", "--adam-eps 1e-6",
                     "--clip-norm 1.0", "--max-update 260000", "--update-freq 32"):  # 8 x 4096 x 32 = 256 x 4096
            assert flag in t8, flag

    def test_fsdp_needs_fairscale(self, opus, tmp_path):
        try:
            import fairscale  # noqa: F401
            pytest.skip("fairscale is installed here")
        except ImportError:
            pass
        proc = sh("opus100/train.sh", "1000l", 8, "--data", opus["out"] / "bin", "--save-dir", tmp_path / "f",
                  check=False)
        assert proc.returncode == 5 and "pip install 'fairscale==0.4.13'" in proc.stderr
        assert not (tmp_path / "f").exists()  # failed before anything ran
        none = sh("opus100/train.sh", "1000l", 8, "--sharding", "none", "--data", opus["out"] / "bin", "--dry-run",
                  "--save-dir", tmp_path / "n").stdout
        assert "--ddp-backend c10d" in none and "fully_sharded" not in none


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
    assert "| 27.8 (27.8) |" in rows["DeepNet"] and "28.9 (28.9) |" in rows["DeepNet"]
    assert "diverged (diverged)" in rows["Vanilla Post-LN"] and "28.1 (28.1)" in rows["Vanilla Post-LN"]
    assert "1.0 (diverged)" not in rows["ReZero"] and "diverged (diverged)" in rows["ReZero"]
    assert "diverged (28.1)" in rows["Vanilla Pre-LN"]  # Table 1: Pre-LN 18L-18L = 28.1
    header = md.splitlines()[0]
    assert header.split("|")[2:6] == [" 6L-6L ", " 18L-18L ", " 50L-50L ", " 100L-100L "]
    csv_rows = {(r.split(",")[0], r.split(",")[1]): r for r in csv_path.read_text().splitlines()[1:]}
    assert csv_rows[("post-ln", "100L-100L")].startswith("post-ln,100L-100L,diverged,,,diverged,exit code 3")
    assert csv_rows[("deepnorm", "100L-100L")].startswith("deepnorm,100L-100L,ok,28.9,27.9,28.9,")
    assert "loss blew up" in csv_rows[("rezero", "18L-18L")]
    assert csv_rows[("dlcl", "6L-6L")].startswith("dlcl,6L-6L,not run,,,27.4,")
    assert csv_rows[("admin", "18L-18L")].startswith("admin,18L-18L,not run,,,28.8,")
    opus = subprocess.run([sys.executable, str(SCRIPTS / "collect_results.py"), grid, "--recipe", "opus100"],
                          capture_output=True, text=True, check=True).stdout
    assert "| Baseline | 24 | 173M | 29.5 | 22.9 | 26.2 |" in opus
    assert "| DeepNet | 1000 | 3.8B | 33.9 | 30.2 | 32.1 |" in opus


# ---- one source of truth: the paper's tables, the generated configs, the data steps -----------------------
sys.path.insert(0, str(SCRIPTS))
from deepnet_recipes import paper  # noqa: E402
from deepnet_recipes.configs import configs  # noqa: E402

PAPER_TABLES = REPO.parent / "shared" / "docs" / "paper-tables.md"  # CI keeps shared/ next to the clone


def _md_rows(text: str, heading: str) -> list:
    """The body rows (lists of stripped cells) of the first Markdown table after ``heading``."""
    rows, seen = [], False
    for line in text[text.index(heading):].splitlines()[1:]:
        if line.startswith("|"):
            seen = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif seen:
            break
    return rows[1:]  # without the header row


def _hparam_cells(table: str) -> dict:
    """Rows of the appendix hyperparameter table as paper-tables.md writes them, from ``paper``."""
    hp = {"Table 4": paper.TABLE4_IWSLT14, "Table 5": paper.TABLE5_WMT17, "Table 6": paper.TABLE6_FIG7,
          "Table 7": paper.TABLE7_OPUS100, "Table 8": paper.TABLE8_102LANG}[table]
    lr = paper.fmt(hp.lr)
    if table == "Table 5":
        lr = f"No-LN {paper.fmt(paper.TABLE5_NO_LN_LR)}; Pre-LN, Post-LN, DeepNorm {lr}"
    batch = f"{hp.batch_tokens // 4096} x 4096" if hp.batch_tokens % 4096 == 0 else str(hp.batch_tokens)
    length = f"{hp.max_update // 1000}K updates" if hp.max_update else f"{hp.max_epoch} epochs"
    size = f"{hp.embed_dim} / {hp.ffn_dim} / {hp.heads}"
    if table == "Table 6":
        depth = f"{paper.FIG7_DEPTH}L-{paper.FIG7_DEPTH}L"
        size = ", ".join(f"{d}-{f}-{h}" for d, f, h in paper.FIG7_SIZES) + f" at {depth}"
    if table == "Table 8":
        size += f", {paper.TABLE8_LAYERS}L-{paper.TABLE8_LAYERS}L"
    return {"learning rate": lr, "scheduler": hp.scheduler.replace("_", " "), "warm-up updates": str(hp.warmup_updates),
            "warm-up init lr": paper.fmt(hp.warmup_init_lr), "max tokens": batch, "Adam eps": paper.fmt(hp.adam_eps),
            "Adam betas": f"({hp.adam_betas[0]}, {hp.adam_betas[1]})", "label smoothing": paper.fmt(hp.label_smoothing),
            "training length": length, "gradient clipping": paper.fmt(hp.clip_norm), "dropout": paper.fmt(hp.dropout),
            "weight decay": paper.fmt(hp.weight_decay), "hidden / FFN / heads": size}


@pytest.mark.skipif(not PAPER_TABLES.exists(), reason=f"{PAPER_TABLES} not here (CI keeps shared/ next to the clone)")
def test_paper_module_equals_paper_tables_md():
    text = PAPER_TABLES.read_text(encoding="utf-8")
    labels = {v: k for k, v in paper.SCHEME_LABEL.items()}
    table1 = {labels[r[0]]: (r[1], tuple(r[2:])) for r in _md_rows(text, "## Table 1")}
    assert {k: v[1] for k, v in table1.items()} == paper.TABLE1
    assert list(table1) == paper.TABLE1_SCHEMES
    assert {k: v[0] for k, v in table1.items()} == paper.LN_GROUP
    table2 = [(r[0], int(r[1]), r[2], float(r[3]), float(r[4]), float(r[5])) for r in _md_rows(text, "## Table 2")]
    assert table2 == [(r.model, r.layers, r.params, r.x_en, r.en_x, r.avg) for r in paper.TABLE2]
    rows = _md_rows(text, "## Hyperparameter tables")
    tables = ["Table 4", "Table 5", "Table 6", "Table 7", "Table 8"]
    assert len(rows) == 13
    for row in rows:
        for table, cell in zip(tables, row[1:], strict=True):
            assert _hparam_cells(table)[row[0]] == cell, (row[0], table)
    fig6 = text[text.index("- Fig. 6"):text.index("- Fig. 7")]
    for values in paper.FIG6_APPROX.values():
        assert all(f"about {v:g}" in fig6 or f" {v:g} " in fig6 or f"to {v:g}" in fig6 for v in values.values())
    assert {s for _, schemes in paper.FIG6_PANELS for s in schemes} == set(paper.TABLE1_SCHEMES)
    fig8 = text[text.index("Fig. 8"):].split("\n")[0]
    assert "about " + ", ".join(str(v) for v in paper.FIG8_APPROX.values()) in fig8
    assert "{" + ", ".join(str(d) for d in paper.FIG8_APPROX) + "}" in fig8


def test_configs_are_generated_from_the_recipes():
    """configs/*.yaml are exactly what ``python -m deepnet_recipes.configs`` writes from train.sh's flags."""
    generated = configs()
    assert len(generated) == 6
    for name, text in generated.items():
        assert (REPO / "configs" / name).read_text(encoding="utf-8") == text, f"{name} is stale: regenerate it"
    wmt = generated["wmt17_en_de_deepnet.yaml"]
    assert "  lr: [0.0015]" in wmt and "  dropout: 0.4" in wmt and "  update_freq: [16]" in wmt
    iwslt = generated["iwslt14_de_en_deepnet.yaml"]
    assert "  max_tokens: 4000" in iwslt and "  encoder_ffn_embed_dim: 2048" in iwslt and "  dropout: 0.4" in iwslt
    t8 = generated["table8_102lang_deepnet_200l.yaml"]
    assert "  dropout: 0.1" in t8 and "  warmup_updates: 6000" in t8 and "  encoder_embed_dim: 1024" in t8


def test_fig7_grid_dry_run(tmp_path):
    out = sh("wmt17/fig7.sh", 8, "--dry-run", "--out", tmp_path).stdout
    trains = [line for line in out.splitlines() if line.startswith("fairseq-train")]
    assert len(trains) == 7  # lr x3, batch x3, size x3, the default point shared
    for line in trains:
        for flag in ("--encoder-layers 18", "--adam-eps 1e-6", "--clip-norm 1.0", "--weight-decay 0.0",
                     "--max-update 30000", "--warmup-updates 4000"):
            assert flag in line, flag
    assert sum("--lr 1.5e-3" in t for t in trains) == 1 and sum("--lr 5e-4" in t for t in trains) == 5
    assert sum("--update-freq 32" in t for t in trains) == 1 and sum("--update-freq 8 " in t for t in trains) == 1
    assert sum("--encoder-embed-dim 1024 --encoder-ffn-embed-dim 4096 --encoder-attention-heads 16" in t
               for t in trains) == 1


def test_moses_steps_follow_fairseq_scripts(tmp_path):
    """Each tokenize variant does what the fairseq script's pipe does on the same line: tokenizer.perl escapes,
    train text is normalized and cleaned of non-printing characters (WMT), test text only tokenized."""
    line = "„Das Haus“ – it's a well-known test & more\u00a0ok\n"
    src = tmp_path / "in.txt"
    src.write_text(line, encoding="utf-8")
    tool = [sys.executable, "-m", "deepnet_recipes.tools", "tokenize", str(src)]
    env = dict(os.environ, PYTHONPATH=str(SCRIPTS))

    def run(name: str, *flags: str) -> str:
        subprocess.run([*tool, str(tmp_path / name), "--lang", "de", *flags], env=env, check=True,
                       capture_output=True)
        return (tmp_path / name).read_text(encoding="utf-8").strip()

    # (German: tokenizer.perl splits the apostrophe off both sides, "it &apos; s")
    # prepare-wmt14en2de.sh, train: normalize-punctuation.perl | remove-non-printing-char.perl | tokenizer.perl -a
    assert run("train", "--normalize-punctuation", "--remove-non-printing", "--aggressive") == \
        "&quot; Das Haus &quot; - it &apos; s a well @-@ known test &amp; more ok"
    # prepare-wmt14en2de.sh, test: tokenizer.perl -a only (the German quotes and the dash stay)
    assert run("test", "--aggressive") == "„ Das Haus “ – it &apos; s a well @-@ known test &amp; more ok"
    # prepare-iwslt14.sh: tokenizer.perl (no -a) | lowercase.perl
    assert run("iwslt", "--lowercase") == "„ das haus “ – it &apos; s a well-known test &amp; more ok"


def test_iwslt_train_filter_is_fairseqs():
    from deepnet_recipes.tools import iwslt_train_lines

    lines = ["<url>http://x</url>", "<keywords>a, b</keywords>", "<talkid>1</talkid>", "<speaker>Jane</speaker>",
             "<title>Hi</title>", "<description>About: x</description>", "text <url> inside", "plain text",
             '<reviewer href="r">R</reviewer>']
    assert list(iwslt_train_lines(lines)) == ["<speaker>Jane</speaker>", "Hi", "About: x", "plain text",
                                              '<reviewer href="r">R</reviewer>']


def test_bleu_primary_must_be_computed(tmp_path):
    gen = tmp_path / "generate.out"
    gen.write_text("H-0\t-0.1\ta b c d\nD-0\t-0.1\ta b c d\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("a b c d\n")
    env = dict(os.environ, PYTHONPATH=str(SCRIPTS))
    tool = [sys.executable, "-m", "deepnet_recipes.tools", "bleu", "--generate-output", str(gen)]
    proc = subprocess.run([*tool, "--ref-raw", str(ref), "--primary", "tok_bleu"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "--primary tok_bleu: not computed" in proc.stderr
    proc = subprocess.run([*tool, "--ref-tok", str(ref)], env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "no 'Generate ... BLEU4 = ' line" in proc.stderr
    gen.write_text(gen.read_text() + "Generate test with beam=5: BLEU4 = 37.50, 100.0/100.0/100.0/100.0 (BP=1.000)\n")
    subprocess.run([*tool, "--ref-tok", str(ref), "--json", str(tmp_path / "b.json")], env=env, check=True,
                   capture_output=True)
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["bleu"] == result["fairseq_bleu"] == 37.5 and result["tok_bleu"] == 100.0


# ---- Figs. 6 and 8: our runs next to the values read off the paper's figures -------------------------------
def _collect_results():
    spec = importlib.util.spec_from_file_location("collect_results", SCRIPTS / "collect_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _series(panel: dict) -> dict:
    return {s["label"]: ([tuple(p) for p in s["points"]], s["reference"]) for s in panel["series"]}


def test_collect_results_plots_fig6_with_the_papers_values(tmp_path):
    grid = tmp_path / "iwslt"
    _fake_run(grid, "deepnorm", 10, 0, [9.0, 5.0], bleu=30.25)
    _fake_run(grid, "deepnorm", 20, 0, [9.0, 5.0], bleu=31.0)
    _fake_run(grid, "post-ln", 10, 0, [9.0, 5.0], bleu=3.5)
    _fake_run(grid, "post-ln", 20, 3, [9.0, 11.0])  # diverged: plotted at 0, as the paper does
    _fake_run(grid, "dlcl", 10, 1, [9.0])  # failed: not plotted
    _fake_run(grid, "rezero", 10, 0, [9.0, 5.0], bleu=26.5)
    png = tmp_path / "fig" / "fig6.png"
    assert _collect_results().main([str(grid), "--recipe", "iwslt14", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(png.with_suffix(".json").read_text())
    assert [p["title"] for p in data["panels"]] == ["Post-LN", "No-LN", "Pre-LN"]
    post, no_ln, pre = (_series(p) for p in data["panels"])
    read_off = "paper, read off Fig. 6 (approximate)"
    assert post["DeepNet"] == ([(10, 30.25), (20, 31.0)], False)
    assert post["Vanilla Post-LN"] == ([(10, 3.5), (20, 0.0)], False)
    assert no_ln["ReZero"] == ([(10, 26.5)], False) and "DLCL" not in pre
    assert "DS-Init" not in post and "Admin" not in post  # no runs, no values read off the figure
    # every scheme with a value read off Fig. 6 is overlaid, dashed, with exactly paper.py's values
    overlays = {label.split(":")[0]: points for panel in (post, no_ln, pre)
                for label, (points, reference) in panel.items() if reference and label.endswith(read_off)}
    expected = {paper.SCHEME_LABEL[s]: sorted(v.items()) for s, v in paper.FIG6_APPROX.items()}
    assert overlays == expected
    assert all(f"DeepNet: {read_off}" in panel for panel in (post, no_ln, pre))
    assert "read off the figure (approximate)" in data["note"]


def test_collect_results_plots_fig8_and_refuses_a_plot_for_table1(tmp_path, capsys):
    grid = tmp_path / "opus"
    _fake_run(grid, "deepnorm", 100, 0, [9.0, 5.0], bleu=30.5)
    _fake_run(grid, "deepnorm", 6, 0, [9.0, 5.0], bleu=24.0)
    png = tmp_path / "fig8.png"
    collect = _collect_results()
    assert collect.main([str(grid), "--recipe", "opus100", "--plot", str(png)]) == 0
    data = json.loads(png.with_suffix(".json").read_text())
    (panel,) = data["panels"]
    assert data["log_x"] and "total layers" in data["xlabel"]
    assert _series(panel) == {
        "DeepNet": ([(12, 24.0), (200, 30.5)], False),
        "DeepNet: paper, read off Fig. 8 (approximate)": (sorted(paper.FIG8_APPROX.items()), True),
    }
    with pytest.raises(SystemExit) as exit_:
        collect.main([str(grid), "--recipe", "wmt17", "--plot", str(png)])
    assert exit_.value.code == 2 and "--plot" in capsys.readouterr().err


# ---- the installed commands outside a checkout ------------------------------------------------------------
def test_sweep_scores_in_process_without_scripts(tmp_path, monkeypatch):
    """deepnet-sweep runs only fairseq-train and fairseq-generate; the scoring runs in its own process."""
    from deepnet_fairseq.cli import sweep

    calls = []

    def fake_run(cmd, stdout=None, **kwargs):
        calls.append(Path(cmd[0]).name)
        if calls[-1] == "fairseq-train":
            stdout.write('x | INFO | valid | {"valid_loss": "5.5"}\nx | INFO | valid | {"valid_loss": "5.0"}\n')
        elif calls[-1] == "fairseq-generate":
            stdout.write("S-1\tb\nD-1\t-0.2\tthe old bridge\nD-0\t-0.1\tthe house is small\n")
        else:
            raise AssertionError(f"deepnet-sweep ran {cmd}")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    reference = tmp_path / "test.en"
    reference.write_text("the house is small\nthe old bridge\n")
    args = argparse.Namespace(threads=1, updates=4, dim=16, lr=1e-3, warmup=2, max_tokens=100)
    result = sweep.run_one(tmp_path / "bin", reference, tmp_path / "out", "deepnorm", 2, args)
    assert calls == ["fairseq-train", "fairseq-generate"]
    assert result["bleu"] == 100.0 and not result["diverged"] and result["final_valid_loss"] == 5.0
    bleu = json.loads((tmp_path / "out" / "deepnorm_2L" / "bleu.json").read_text())
    assert bleu["bleu"] == 100.0 and bleu["signature"].startswith("nrefs:1|case:mixed")
    assert (tmp_path / "out" / "deepnorm_2L" / "test.hyp").read_text() == reference.read_text()


@pytest.mark.parametrize("command", ["deepnet-sweep", "deepnet-analyze"])
def test_bundled_data_outside_a_checkout_asks_for_data(command, tmp_path, monkeypatch, capsys):
    from deepnet_fairseq.analysis import data
    from deepnet_fairseq.cli.analyze import main as analyze_main
    from deepnet_fairseq.cli.sweep import main as sweep_main

    monkeypatch.setattr(data, "CHECKOUT", tmp_path / "site-packages")  # an installed copy: no scripts/, no data/
    main, argv = {"deepnet-sweep": (sweep_main, ["--schemes", "deepnorm", "--depths", "2"]),
                  "deepnet-analyze": (analyze_main, ["fig5"])}[command]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "pass --data DIR" in err and "(not found: " in err and "scripts/demo.sh" in err
    assert not (tmp_path / "out" / "data").exists()


def test_read_hypotheses_names_the_first_missing_id(tmp_path):
    from deepnet_fairseq.evaluation import MissingHypotheses, read_hypotheses

    log = tmp_path / "generate.out"
    log.write_text("S-1\tx\nH-1\t-0.3\tb\nD-1\t-0.3\tB\nH-0\t-0.2\ta\nD-0\t-0.2\tA\n")
    assert read_hypotheses(log, 2) == ["A", "B"]  # the D- lines, in sample-id order
    log.write_text("H-1\t-0.3\tb\nH-0\t-0.2\n")
    assert read_hypotheses(log, 2) == ["", "b"]  # an empty hypothesis is kept
    with pytest.raises(MissingHypotheses, match="hypotheses for 2 of 3 reference lines \\(first missing id 2\\)"):
        read_hypotheses(log, 3)
