"""The demo pipeline (scripts/demo.sh and its helpers) on a few hundred pairs, plus the corpus split."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
BUNDLED_TSV = REPO / "data" / "tatoeba-deu-eng" / "deu-eng.tsv.gz"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


split_corpus = load_script("split_corpus")


def demo_env(out: Path, **knobs) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHON=sys.executable, DEMO_OUT=str(out))
    # The fairseq console scripts live next to this interpreter (the venv's bin/).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({key: str(value) for key, value in knobs.items()})
    return env


def read_lines(path: Path):
    return path.read_text(encoding="utf-8").splitlines()


def run_demo(out: Path, **knobs) -> subprocess.CompletedProcess:
    """scripts/demo.sh with these knobs, to completion (no time limit), output captured."""
    return subprocess.run(["bash", str(SCRIPTS / "demo.sh")], cwd=REPO, env=demo_env(out, **knobs),
                          capture_output=True, text=True)


def test_demo_end_to_end_tiny(tmp_path):
    """The data stage alone, then the whole demo, which reuses that data (same inputs and knobs)."""
    out = tmp_path / "demo"
    # DEMO_MAX_MINUTES=0: no cap on training time, so a slow machine still trains every update
    knobs = dict(DEMO_PAIRS=300, DEMO_VALID_PAIRS=30, DEMO_TEST_PAIRS=30, DEMO_LAYERS=2, DEMO_UPDATES=20,
                 DEMO_MAX_TOKENS=500, DEMO_LOG_INTERVAL=2, DEMO_PROGRESS_SECONDS=5, DEMO_BEAM=2, DEMO_MAX_MINUTES=0)
    proc = run_demo(out, DEMO_STAGE="data", **knobs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"data ready: {out / 'data' / 'bin'}" in proc.stdout
    assert not (out / "summary.json").exists()
    stamp = (out / "data" / "stamp").read_text()

    proc = run_demo(out, **knobs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data: reusing" in proc.stdout
    assert (out / "data" / "stamp").read_text() == stamp
    assert "sacreBLEU signature: nrefs:1|case:mixed|eff:no|tok:13a" in proc.stdout
    assert f"summary: {out / 'summary.json'}" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["encoder_layers"] == summary["decoder_layers"] == 2
    test_refs = read_lines(out / "data" / "text" / "test.en")
    assert len(test_refs) >= 30
    for name in ("deepnorm", "postln"):
        model = summary["models"][name]
        assert isinstance(model["bleu"], float) and 0.0 <= model["bleu"] <= 100.0
        assert model["updates"] == 20
        assert model["parameters"] > 0
        assert model["wall_seconds"] > 0
        assert isinstance(model["diverged"], bool)
        hyp = out / name / "test.hyp.en"
        assert hyp.exists() and len(read_lines(hyp)) == len(test_refs)
    # Same architecture and flags except --deepnorm, so the same parameter count.
    assert summary["models"]["deepnorm"]["parameters"] == summary["models"]["postln"]["parameters"]
    assert "--deepnorm" not in summary["train_args"]
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC


def write_tsv(path: Path, rows) -> None:
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")


def split_files(out: Path, name: str):
    return read_lines(out / f"{name}.en"), read_lines(out / f"{name}.de")


def test_split_keeps_each_english_sentence_in_one_split(tmp_path):
    rows = []
    for i in range(200):
        # Every third English sentence has three German translations (du / ihr / Sie forms).
        for j in range(3 if i % 3 == 0 else 1):
            rows.append((f"English sentence {i}.", f"Deutscher Satz {i} Variante {j}.", f"attr #{i} & #{j}"))
    write_tsv(tmp_path / "pairs.tsv", rows)
    out = tmp_path / "split"
    assert split_corpus.main(["--tsv", str(tmp_path / "pairs.tsv"), "--out-dir", str(out),
                              "--valid-size", "40", "--test-size", "40"]) == 0

    english = {name: split_files(out, name)[0] for name in ("train", "valid", "test")}
    assert sum(len(v) for v in english.values()) == len(rows)
    assert not set(english["train"]) & set(english["valid"])
    assert not set(english["train"]) & set(english["test"])
    assert not set(english["valid"]) & set(english["test"])
    for name in ("valid", "test"):
        assert 40 <= len(english[name]) < 43  # filled with whole groups
    # Each multi-translation sentence has all three of its lines in one split.
    for i in range(0, 200, 3):
        counts = [english[name].count(f"English sentence {i}.") for name in english]
        assert sorted(counts) == [0, 0, 3]
    # Pairs stay aligned, the attribution travels with them.
    en, de = split_files(out, "test")
    attr = read_lines(out / "test.attribution")
    for e, d, a in zip(en, de, attr, strict=True):
        number = e.split()[2].rstrip(".")
        assert d.startswith(f"Deutscher Satz {number} ") and a.startswith(f"attr #{number} ")

    # Deterministic: the same input gives byte-identical files.
    again = tmp_path / "again"
    split_corpus.main(["--tsv", str(tmp_path / "pairs.tsv"), "--out-dir", str(again),
                       "--valid-size", "40", "--test-size", "40"])
    for name in ("train.en", "valid.de", "test.attribution"):
        assert (out / name).read_bytes() == (again / name).read_bytes()


def test_split_of_bundled_tatoeba_has_no_shared_english(tmp_path):
    out = tmp_path / "split"
    assert split_corpus.main(["--tsv", str(BUNDLED_TSV), "--out-dir", str(out)]) == 0
    english = {name: set(split_files(out, name)[0]) for name in ("train", "valid", "test")}
    assert not english["train"] & (english["valid"] | english["test"])
    assert not english["valid"] & english["test"]
    counts = {name: len(read_lines(out / f"{name}.de")) for name in english}
    assert sum(counts.values()) == 10057
    assert 500 <= counts["valid"] < 520 and 500 <= counts["test"] < 520
    with gzip.open(BUNDLED_TSV, "rt", encoding="utf-8") as handle:
        first = handle.readline().rstrip("\n").split("\t")
    assert first[2].startswith("CC-BY 2.0 (France) Attribution: tatoeba.org")
    assert len(read_lines(out / "train.attribution")) == counts["train"]


def test_split_accepts_parallel_files_and_refuses_bad_input(tmp_path, capsys):
    src, tgt = tmp_path / "corpus.de", tmp_path / "corpus.en"
    src.write_text("".join(f"Satz {i}\n" for i in range(50)), encoding="utf-8")
    tgt.write_text("".join(f"Sentence {i % 40}\n" for i in range(50)), encoding="utf-8")
    out = tmp_path / "split"
    assert split_corpus.main(["--src", str(src), "--tgt", str(tgt), "--out-dir", str(out),
                              "--valid-size", "5", "--test-size", "5"]) == 0
    assert not (out / "train.attribution").exists()
    english = {name: set(split_files(out, name)[0]) for name in ("train", "valid", "test")}
    assert not english["train"] & (english["valid"] | english["test"])

    short = tmp_path / "short.en"
    short.write_text("only one line\n", encoding="utf-8")
    assert split_corpus.main(["--src", str(src), "--tgt", str(short), "--out-dir", str(out)]) == 2
    assert "misaligned" in capsys.readouterr().err

    empty = tmp_path / "empty.tsv"
    empty.write_text("\n", encoding="utf-8")
    assert split_corpus.main(["--tsv", str(empty), "--out-dir", str(out)]) == 2
    assert f"{empty}: file is empty" in capsys.readouterr().err

    broken = tmp_path / "broken.tsv"
    broken.write_text("Hello.\tHallo.\nno tab here\n", encoding="utf-8")
    assert split_corpus.main(["--tsv", str(broken), "--out-dir", str(out), "--valid-size", "0",
                              "--test-size", "0"]) == 2
    assert f"{broken}:2:" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        split_corpus.main(["--out-dir", str(out)])  # neither --tsv nor --src/--tgt
