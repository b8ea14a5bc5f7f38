"""fairseq's language-model and bucketing paths on NumPy 2 (names it removed; see deepnet_fairseq.compat).

One tiny ``deepnet_lm --deepnorm`` run (``--sample-break-mode eos``) is shared by the module's tests:
hub ``sample()``/``score()``/``generate()`` and ``fairseq-interactive --task language_modeling`` use it.
"""

from __future__ import annotations

import ast
import importlib
import math
from pathlib import Path

import numpy
import pytest
import torch
from fairseq import options, tasks

import deepnet_fairseq  # noqa: F401  (installs the fixes, as a user's import does)
from conftest import USER_DIR, cli, logged_updates, run
from deepnet_fairseq.build import parse_command_line
from deepnet_fairseq.compat import FAIRSEQ_MODULES_USING_REMOVED_NUMPY, FAIRSEQ_NUMPY, install_numpy2_names

# module-scoped training fixture: keep this file on one xdist worker
pytestmark = pytest.mark.xdist_group("test_numpy_compat")

LM_UPDATES = 6
PERCENTILE_LIKE = {"percentile", "nanpercentile", "quantile", "nanquantile"}


@pytest.fixture(scope="module")
def lm_data(tiny_data, tmp_path_factory) -> Path:
    """The toy corpus's source side binarized for language modeling (``fairseq-preprocess --only-source``)."""
    from fairseq_cli import preprocess

    root = tmp_path_factory.mktemp("numpy_lm")
    raw = tiny_data.parent
    preprocess.main(options.get_preprocessing_parser().parse_args(
        ["--only-source", "--trainpref", str(raw / "train.src"), "--validpref", str(raw / "valid.src"),
         "--destdir", str(root), "--workers", "1"]))
    return root


@pytest.fixture(scope="module")
def lm_run(lm_data, tmp_path_factory):
    """A 2-layer d=32 ``deepnet_lm --deepnorm`` trained for a few updates with ``--sample-break-mode eos``."""
    save_dir = tmp_path_factory.mktemp("numpy_lm_ckpt")
    proc = run([cli("fairseq-train"), lm_data, "--user-dir", USER_DIR, "--task", "language_modeling",
                "--arch", "deepnet_lm", "--deepnorm", "--decoder-layers", "2", "--decoder-embed-dim", "32",
                "--decoder-input-dim", "32", "--decoder-output-dim", "32", "--decoder-ffn-embed-dim", "64",
                "--decoder-attention-heads", "2", "--tokens-per-sample", "32",
                "--sample-break-mode", "eos", "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "256",
                "--max-update", str(LM_UPDATES), "--cpu", "--seed", "1", "--no-progress-bar", "--log-format", "json",
                "--log-interval", "1", "--save-dir", save_dir, "--num-workers", "0", "--no-epoch-checkpoints"])
    return save_dir, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def lm_hub(lm_run, lm_data):
    from fairseq.models.transformer_lm import TransformerLanguageModel

    return TransformerLanguageModel.from_pretrained(str(lm_run[0]), checkpoint_file="checkpoint_last.pt",
                                                    data_name_or_path=str(lm_data))


def setup_task(data: Path, task_name: str, *flags: str):
    """``tasks.setup_task`` on a fairseq-train command line (through the plugin)."""
    return tasks.setup_task(parse_command_line([data, *flags], task=task_name))


def test_lm_trains_with_sample_break_mode_eos(lm_run, lm_data, tiny_data):
    save_dir, log = lm_run
    losses = logged_updates(log)
    assert sorted(losses) == list(range(1, LM_UPDATES + 1))
    assert all(math.isfinite(v) for v in losses.values())
    assert (save_dir / "checkpoint_last.pt").exists()

    # eos break mode: sample i is line i of the corpus followed by </s>
    task = setup_task(lm_data, "language_modeling", "--arch", "deepnet_lm", "--sample-break-mode", "eos",
                      "--tokens-per-sample", "32")
    task.load_dataset("valid")
    dataset, dictionary = task.dataset("valid"), task.dictionary
    lines = (tiny_data.parent / "valid.src").read_text().splitlines()
    assert [dictionary.string(dataset[i]["target"]) for i in range(len(dataset))] == lines
    assert all(dataset[i]["target"][-1] == dictionary.eos() for i in range(len(dataset)))


def test_hub_score_matches_a_forward_pass(lm_hub):
    sentence = "w1 w2 w3"
    scored = lm_hub.score(sentence)
    words = lm_hub.encode(sentence)[:-1]  # score() scores the words, not the </s> that encode() appends
    eos = lm_hub.task.dictionary.eos()
    with torch.no_grad():
        logits = lm_hub.models[0](torch.cat([words.new([eos]), words[:-1]])[None])[0]
        expected = torch.log_softmax(logits.float(), dim=-1)[0].gather(1, words[:, None]).squeeze(1)
    assert scored["tokens"].tolist() == words.tolist()
    assert torch.allclose(scored["positional_scores"], expected, atol=1e-5)


def test_hub_sample_and_generate_continue_the_prompt(lm_hub):
    prompt = "w1 w2"
    out = lm_hub.sample(prompt, beam=1, max_len_b=4)
    words = out.split()
    assert words[:2] == ["w1", "w2"] and len(words) <= 2 + 4
    assert all(lm_hub.task.dictionary.index(w) != lm_hub.task.dictionary.unk() for w in words)

    prompt_tokens = lm_hub.encode(prompt)[:-1]  # without </s>: a prefix to continue
    hypos = lm_hub.generate(prompt_tokens, beam=2, max_len_b=4)
    assert len(hypos) == 2
    for hypo in hypos:
        assert hypo["tokens"][:2].tolist() == prompt_tokens.tolist()
        assert math.isfinite(hypo["score"])


def test_interactive_language_modeling(lm_run, lm_data, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2\nw3\n")
    proc = run([cli("fairseq-interactive"), lm_data, "--user-dir", USER_DIR, "--task", "language_modeling",
                "--path", lm_run[0] / "checkpoint_last.pt", "--cpu", "--beam", "1", "--max-len-b", "4",
                "--input", prompts])
    hypotheses = [line.split("\t")[2].split() for line in proc.stdout.splitlines() if line.startswith("H-")]
    assert len(hypotheses) == 2
    assert hypotheses[0][:2] == ["w1", "w2"] and hypotheses[1][:1] == ["w3"]


def test_num_batch_buckets_on_translation(tiny_data):
    task = setup_task(tiny_data, "translation", "--arch", "deepnet_transformer_tiny", "--num-batch-buckets", "3")
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    assert dataset.buckets is not None
    src_sizes = dataset.src.dataset.sizes  # BucketPadLengthDataset over the raw source
    src_buckets = dataset.src.buckets
    assert 1 <= len(src_buckets) <= 3 and src_buckets.max() == src_sizes.max()
    assert set(src_buckets.tolist()) <= set(src_sizes.tolist())  # "lower" percentiles are sizes of the data
    for size, padded in zip(src_sizes, dataset.src_sizes, strict=True):
        assert padded == min(b for b in src_buckets if b >= size)
    assert (dataset.bucketed_num_tokens >= dataset.src_sizes).all()


def test_crf_and_span_masking_run():
    """The other fairseq sites (not reached by this plugin's models): nacrf_transformer's CRF, wav2vec masks."""
    from fairseq.data import data_utils
    from fairseq.modules import DynamicCRF

    torch.manual_seed(0)
    crf = DynamicCRF(num_embedding=10, low_rank=4, beam_size=3)
    emissions = torch.randn(2, 5, 10)
    targets = torch.randint(0, 10, (2, 5))
    log_likelihood = crf(emissions, targets, torch.ones(2, 5, dtype=torch.bool))
    assert log_likelihood.shape == (2,) and torch.isfinite(log_likelihood).all()
    assert (log_likelihood <= 1e-5).all()

    # no_overlap span masking: np.fromiter(..., np.int) now runs; the next line is fairseq main's own bug
    # (rng.randint on a numpy Generator, on every NumPy version), so this path cannot complete anyway.
    for compute in (data_utils.compute_mask_indices, data_utils.compute_mask_indices_v3):
        with pytest.raises(AttributeError, match="Generator' object has no attribute 'randint'"):
            compute((2, 40), None, mask_prob=0.3, mask_length=3, no_overlap=True, min_space=1)


def test_percentile_view_maps_interpolation_to_method():
    data = [1, 3, 7, 9]
    assert FAIRSEQ_NUMPY.percentile(data, 60, interpolation="lower") == numpy.percentile(data, 60, method="lower") == 3
    with pytest.raises(TypeError, match="both 'interpolation' and 'method'"):
        FAIRSEQ_NUMPY.percentile(data, 60, interpolation="lower", method="higher")


def test_numpy_itself_is_left_unchanged():
    install_numpy2_names()  # idempotent
    for name in FAIRSEQ_MODULES_USING_REMOVED_NUMPY:
        assert importlib.import_module(name).np is FAIRSEQ_NUMPY
    if int(numpy.__version__.split(".")[0]) >= 2:
        for removed in ("int", "float", "compat"):
            assert not hasattr(numpy, removed), removed
        with pytest.raises(TypeError):
            numpy.percentile([1, 2], 50, interpolation="lower")
    assert FAIRSEQ_NUMPY.ndarray is numpy.ndarray and FAIRSEQ_NUMPY.int64 is numpy.int64
    with pytest.raises(AttributeError):
        FAIRSEQ_NUMPY.no_such_numpy_name  # noqa: B018


def removed_numpy_uses(source: str) -> list[tuple[str, int]]:
    """(dotted name or ``name(interpolation=)``, line) for every ``np.*`` use in source that NumPy lacks."""
    tree = ast.parse(source)
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.insert(0, base.attr)
                base = base.value
            if not (isinstance(base, ast.Name) and base.id == "np"):
                continue
            target = numpy
            for attr in chain:
                if not isinstance(target, type(numpy)):
                    break
                if not hasattr(target, attr):
                    found.append((".".join(chain), node.lineno))
                    break
                target = getattr(target, attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in PERCENTILE_LIKE
              and any(k.arg == "interpolation" for k in node.keywords)):
            found.append((f"{node.func.attr}(interpolation=)", node.lineno))
    return found


def test_every_removed_numpy_name_fairseq_uses_resolves():
    """Scan fairseq (not examples/): each use of a name NumPy lacks must resolve in that module's ``np``."""
    import fairseq

    root = Path(fairseq.__file__).parent
    sites = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        if rel.parts[1] == "examples":
            continue
        source = path.read_text(encoding="utf-8", errors="replace")
        if "np." not in source:
            continue
        uses = removed_numpy_uses(source)
        if uses:
            sites[".".join(rel.with_suffix("").parts)] = uses
    if int(numpy.__version__.split(".")[0]) >= 2:
        assert sites, "the scan found nothing: it no longer sees fairseq's known uses"
    for module_name, uses in sites.items():
        np_view = importlib.import_module(module_name).np
        for name, line in uses:
            where = f"{module_name}:{line} np.{name}"
            if name.endswith("(interpolation=)"):
                func = getattr(np_view, name.split("(")[0])
                assert func([1, 3, 7, 9], 60, interpolation="lower") == 3, where
                continue
            value = np_view
            for attr in name.split("."):
                assert hasattr(value, attr), where
                value = getattr(value, attr)
