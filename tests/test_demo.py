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


def clean_env() -> dict:
    """The environment without any DEMO_* knob, to run a command printed by the demo as printed."""
    return {key: value for key, value in os.environ.items() if not key.startswith("DEMO_")}


# A two-column TSV (target, source; no attribution) in two non-Latin scripts: Japanese -> Russian.
# 12 nouns (Japanese; Russian nominative, accusative) in 5 sentence frames = 60 pairs.
NOUNS = [("猫", "кошка", "кошку"), ("犬", "собака", "собаку"), ("本", "книга", "книгу"), ("水", "вода", "воду"),
         ("魚", "рыба", "рыбу"), ("音楽", "музыка", "музыку"), ("お茶", "чай", "чай"), ("パン", "хлеб", "хлеб"),
         ("花", "цветок", "цветок"), ("車", "машина", "машину"), ("手紙", "письмо", "письмо"),
         ("りんご", "яблоко", "яблоко")]
FRAMES = [("私は{ja}が好きです。", "Я люблю {acc}."), ("{ja}はどこですか。", "Где {nom}?"),
          ("{ja}はここにあります。", "{Nom} здесь."), ("{ja}が見えます。", "Я вижу {acc}."),
          ("{ja}が欲しいです。", "Я хочу {acc}.")]


def write_ja_ru_tsv(path: Path) -> None:
    rows = [(ru.format(nom=nom, acc=acc, Nom=nom.capitalize()), ja.format(ja=noun))
            for noun, nom, acc in NOUNS for ja, ru in FRAMES]
    path.write_text("".join(f"{target}\t{source}\n" for target, source in rows), encoding="utf-8")


def test_demo_stopped_by_its_time_cap_resumes_to_the_same_model(tmp_path):
    """Own corpus (Japanese -> Russian, two-column TSV) through the whole demo, stopped by the safety cap.

    The cap (DEMO_MAX_MINUTES=1e-7: 6 µs of training time) stops both models after their first update,
    on any machine. The demo then reports the run as incomplete, with no BLEU, and prints a resume command;
    run as printed, it finishes the same run: the DeepNorm checkpoint equals, tensor for tensor, an
    uninterrupted run of the same command line (one thread, so fairseq on a CPU is deterministic).
    The finished demo prints BLEU, examples and a fairseq-interactive command that works as printed.
    """
    import torch

    from conftest import fairseq_main

    tsv = tmp_path / "ja-ru.tsv"
    write_ja_ru_tsv(tsv)
    out = tmp_path / "demo"
    knobs = dict(DEMO_TSV=tsv, DEMO_SRC_LANG="ja", DEMO_TGT_LANG="ru", DEMO_VALID_PAIRS=6, DEMO_TEST_PAIRS=6,
                 DEMO_VOCAB=150, DEMO_LAYERS=1, DEMO_DIM=32, DEMO_FFN=64, DEMO_UPDATES=6, DEMO_MAX_TOKENS=200,
                 DEMO_LOG_INTERVAL=1, DEMO_PROGRESS_SECONDS=5, DEMO_BEAM=2)
    proc = run_demo(out, DEMO_MAX_MINUTES="1e-7", **knobs)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "!! INCOMPLETE RUN" in proc.stderr
    assert "deepnorm at update 1," in proc.stderr and "postln at update 1," in proc.stderr
    assert not (out / "summary.json").exists() and not (out / "deepnorm" / "bleu.json").exists()
    resume = proc.stderr.strip().splitlines()[-1]
    assert resume.startswith("DEMO_RESUME=1 DEMO_MAX_MINUTES=0 ") and "DEMO_TSV=" in resume

    proc = subprocess.run(["bash", "-c", resume], cwd=tmp_path, env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data: reusing" in proc.stdout
    assert "deepnorm: resuming from" in proc.stdout and "postln: resuming from" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    for name in ("deepnorm", "postln"):
        model = summary["models"][name]
        assert model["updates"] == 6 and isinstance(model["bleu"], float)
        assert len(read_lines(out / name / "test.hyp.ru")) == len(read_lines(out / "data" / "text" / "test.ru"))
    assert "--deepnorm" not in summary["train_args"]
    assert summary["valid_loss_gap"] == pytest.approx(
        summary["models"]["postln"]["final_valid_loss"] - summary["models"]["deepnorm"]["final_valid_loss"])
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    report = proc.stdout[proc.stdout.index("Example translations"):]
    test_ja = read_lines(out / "data" / "text" / "test.ja")
    assert f"source:    {test_ja[0]}" in report and report.count("reference: ") == 5
    assert report.count("signature: nrefs:1|case:mixed|eff:no|tok:13a") == 2
    assert f"loss plot: {out / 'loss.png'}" in report

    # The printed fairseq-interactive command translates, as printed.
    interactive = proc.stdout.strip().splitlines()[-1]
    assert interactive.startswith("echo ") and "fairseq-interactive" in interactive
    translated = subprocess.run(["bash", "-o", "pipefail", "-c", interactive], cwd=tmp_path, env=clean_env(),
                                capture_output=True, text=True)
    assert translated.returncode == 0, translated.stderr[-3000:]
    assert len(translated.stdout.splitlines()) == 1 and translated.stdout.strip()

    # The same command line, uninterrupted, in this process with one thread: the same model.
    args = read_lines(out / "train_args.txt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fairseq_main("train", [*args, "--deepnorm", "--save-dir", tmp_path / "uninterrupted"])
    finally:
        torch.set_num_threads(threads)
    resumed = torch.load(out / "deepnorm" / "checkpoints" / "checkpoint_last.pt", weights_only=False)["model"]
    straight = torch.load(tmp_path / "uninterrupted" / "checkpoint_last.pt", weights_only=False)["model"]
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[key], straight[key]) for key in straight)


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
