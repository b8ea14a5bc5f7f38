"""``deepnet-export``: a deepnet checkpoint as fairseq's own ``transformer`` (alpha folded into the weights)
and as a CTranslate2 model.

One tiny DeepNorm model is trained in this process (a few dozen updates, shared embeddings, sinusoidal
positions) and exported both ways; stock fairseq (a subprocess that never imports the plugin) and
CTranslate2 must reproduce its translations.  The folding itself is checked on untrained models whose
every parameter is perturbed (so that LayerNorm biases, position tables and tied tables all matter),
across schemes and embedding options.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models.transformer import TransformerModel
from fairseq.models.transformer_lm import TransformerLanguageModel
from fairseq.sequence_generator import SequenceGenerator
from omegaconf import OmegaConf

import deepnet_fairseq  # noqa: F401  (registers the models and the checkpoint allow-list)
from conftest import USER_DIR, fairseq_main, generate_in_process, run, train_args
from deepnet_fairseq.build import build_from_command_line, parse_command_line
from deepnet_fairseq.checkpoints import checkpoint_globals, load_checkpoint
from deepnet_fairseq.cli.export import main as export_main
from deepnet_fairseq.export import (
    AS_IS,
    FOLDED,
    REFUSED,
    ExportError,
    export_state,
    known_schemes,
    residual_weights,
)
from deepnet_fairseq.scheme_record import record_from_model_config
from deepnet_fairseq.schemes import SCHEME_NAMES
from modelkit import sample_batch

pytestmark = pytest.mark.xdist_group("test_export")

SMALL = ("--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
         "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64")
# fairseq main drops the last partial batch unless batches may have any size (the plugin restores it, stock
# fairseq does not): every generation here uses --required-batch-size-multiple 1
GENERATE = ("--gen-subset", "test", "--beam", "1", "--max-len-a", "0", "--max-len-b", "12", "--cpu",
            "--num-workers", "0", "--required-batch-size-multiple", "1")
MAX_LEN = 12  # CTranslate2's max_decoding_length equal to fairseq's max_len_b (hypothesis tokens before </s>)

# fairseq-generate's own entry point in a fresh interpreter that never imports the plugin
STOCK_GENERATE = """
import sys
from fairseq_cli.generate import cli_main
sys.argv = ["fairseq-generate", *sys.argv[1:]]
cli_main()
assert not any(name.startswith("deepnet_fairseq") for name in sys.modules), "the plugin was imported"
print("PLUGIN-NOT-IMPORTED")
"""


def parse(data: Path, *flags: str) -> argparse.Namespace:
    return parse_command_line([data, "--arch", "deepnet_transformer_tiny", "--cpu", *flags])


def build(data: Path, *flags: str) -> Tuple[torch.nn.Module, object, argparse.Namespace]:
    """``(model, task, args)`` as fairseq-train builds them (``build_model`` completes ``args``)."""
    model, task, args = build_from_command_line([data, "--arch", "deepnet_transformer_tiny", "--cpu", *flags])
    return model.eval(), task, args


def perturbed(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> torch.nn.Module:
    """Add fixed noise to every parameter (tied ones once): LayerNorm biases etc. stop being 0/1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


def checkpoint_state(args: argparse.Namespace, model: torch.nn.Module) -> dict:
    """What fairseq-train would save for ``model`` (configuration as fairseq stores it, weights)."""
    cfg = OmegaConf.to_container(convert_namespace_to_omegaconf(args))
    return {"args": None, "cfg": cfg, "model": model.state_dict(), "optimizer_history": [{"num_updates": 7}]}


def load_stock(path: Path) -> Tuple[torch.nn.Module, object, object]:
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    return models[0].eval(), cfg, task


def log_probs(model, src, lengths, prev) -> torch.Tensor:
    with torch.no_grad():
        return model.get_normalized_probs(model(src, lengths, prev), log_probs=True)


def padded_batch(task):
    src, lengths, prev = sample_batch(task, n=4, src_len=9, tgt_len=7)
    src[0, :3] = task.source_dictionary.pad()  # left padding, as fairseq batches sources
    lengths[0] = 6
    return src, lengths, prev


def parse_generation(text: str) -> Dict[int, Tuple[List[str], List[str], float, List[float], List[str]]]:
    """{id: (source, hypothesis, score, positional scores, reference)} from fairseq-generate output."""
    fields: Dict[str, Dict[int, List[str]]] = {"S": {}, "T": {}, "H": {}, "P": {}}
    for line in text.splitlines():
        head, _, rest = line.partition("\t")
        prefix, _, index = head.partition("-")
        if prefix in fields and index.isdigit():
            fields[prefix][int(index)] = rest.split("\t")
    out = {}
    for i, (score, *hyp) in fields["H"].items():
        out[i] = (fields["S"][i][0].split(), (hyp[0] if hyp else "").split(), float(score),
                  [float(p) for p in fields["P"][i][0].split()], fields["T"][i][0].split())
    return out


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """A tiny DeepNorm model (2L-2L, d=64, --share-all-embeddings, sinusoidal positions), 30 updates."""
    save = tmp_path_factory.mktemp("export_trained")
    fairseq_main("train", train_args(tiny_data, save, "--deepnorm", "--share-all-embeddings", "--max-update", "30",
                                     "--no-epoch-checkpoints", "--required-batch-size-multiple", "1",
                                     "--log-interval", "10")[1:])
    return save / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def exported(trained) -> Path:
    out = trained.parent / "exported.pt"
    assert export_main(["--to", "fairseq", str(trained), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def original_generation(tiny_data, trained, tmp_path_factory) -> dict:
    """fairseq-generate (beam 1) of the DeepNet checkpoint through the plugin."""
    text = generate_in_process([tiny_data, "--user-dir", USER_DIR, "--path", trained, *GENERATE],
                               tmp_path_factory.mktemp("export_generate"))
    return parse_generation(text)


CASES = {
    # name: (flags, folded?)
    "deepnorm-shared-sinusoidal": (("--deepnorm", "--share-all-embeddings"), True),
    "deepnorm-shared-learned": (("--deepnorm", "--share-all-embeddings", "--encoder-learned-pos",
                                 "--decoder-learned-pos"), True),
    "deepnorm-separate-sinusoidal": (("--deepnorm",), True),
    "deepnorm-separate-learned": (("--deepnorm", "--encoder-learned-pos", "--decoder-learned-pos"), True),
    "postln-shared-sinusoidal": (("--share-all-embeddings",), False),
    "postln-shared-learned": (("--share-all-embeddings", "--encoder-learned-pos", "--decoder-learned-pos"), False),
    "postln-separate-sinusoidal": ((), False),
    "postln-separate-learned": (("--encoder-learned-pos", "--decoder-learned-pos"), False),
    "deepnorm-decoder-input-output-tied": (("--deepnorm", "--share-decoder-input-output-embed"), True),
    "deepnorm-layernorm-embedding": (("--deepnorm", "--share-all-embeddings", "--layernorm-embedding"), True),
    "deepnorm-no-positions-unscaled": (("--deepnorm", "--no-token-positional-embeddings", "--no-scale-embedding"),
                                       True),
    "admin-profiled-vectors": (("--residual-scheme", "admin"), True),
    "admin-closed-trainable": (("--residual-scheme", "admin-closed", "--admin-omega-trainable"), True),
    "pre-ln": (("--residual-scheme", "pre-ln", "--share-all-embeddings"), False),
    "ds-init": (("--residual-scheme", "ds-init"), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_computes_the_deepnet_model(case, tiny_data, tmp_path) -> None:
    """Stock fairseq's model from the exported file gives the DeepNet model's log-probs (fp32, <= 1e-5);
    embedding sharing is kept exactly where the exported tables are still equal."""
    flags, folded = CASES[case]
    model, task, args = build(tiny_data, *SMALL, *flags)
    perturbed(model)
    state = checkpoint_state(args, model)
    path = tmp_path / "exported.pt"
    torch.save(export_state(state), path)

    stock, cfg, _ = load_stock(path)
    assert type(stock) is TransformerModel  # fairseq's own class, not the plugin's
    batch = padded_batch(task)
    difference = (log_probs(model, *batch) - log_probs(stock, *batch)).abs().max().item()
    assert difference <= 1e-5, f"{case}: max |log-prob difference| {difference}"

    shared = "--share-all-embeddings" in flags
    scaled_tables = folded and "--layernorm-embedding" not in flags
    assert cfg.model.share_all_embeddings == (shared and not scaled_tables)
    assert cfg.model.encoder_learned_pos == ("--encoder-learned-pos" in flags or
                                             (scaled_tables and "--no-token-positional-embeddings" not in flags))
    if not folded:  # an unfolded scheme is copied bit for bit
        assert difference == 0.0
        original = model.state_dict()
        assert all(torch.equal(tensor, original[key]) for key, tensor in stock.state_dict().items())


@pytest.mark.parametrize("flags", [("--deepnorm", "--share-all-embeddings"),
                                   ("--residual-scheme", "admin-closed", "--admin-omega-trainable")])
def test_folding_is_exact_in_float64(flags, tiny_data, tmp_path) -> None:
    """In float64 the folded network's logits equal the DeepNet model's to rounding (the algebra is exact)."""
    model, task, args = build(tiny_data, *SMALL, *flags)
    perturbed(model).double()
    exported = export_state(checkpoint_state(args, model))
    torch.save(exported, tmp_path / "exported.pt")
    stock, _, _ = load_stock(tmp_path / "exported.pt")
    stock.double().load_state_dict(exported["model"])
    src, lengths, prev = padded_batch(task)
    with torch.no_grad():
        difference = (model(src, lengths, prev)[0] - stock(src, lengths, prev)[0]).abs().max().item()
    assert difference <= 1e-10


def test_configuration_saved_as_dictconfig(tiny_data) -> None:
    """fairseq 0.10-0.11 checkpoints store cfg as an OmegaConf DictConfig: exported the same way."""
    model, _, args = build(tiny_data, *SMALL, "--deepnorm")
    state = checkpoint_state(args, model)
    plain_export = export_state(state)
    as_dictconfig = export_state({**state, "cfg": OmegaConf.create(state["cfg"], flags={"allow_objects": True})})
    assert as_dictconfig["cfg"] == plain_export["cfg"]
    assert all(torch.equal(as_dictconfig["model"][k], v) for k, v in plain_export["model"].items())


def test_exported_file_is_plain_fairseq(exported, trained) -> None:
    """Nothing in the file needs an allow-list; it is fairseq's ``transformer`` with a post-ln record and no
    plugin options; training state is dropped, the update count kept."""
    assert checkpoint_globals(exported) == set()
    state = torch.load(exported, weights_only=True)
    model_cfg = state["cfg"]["model"]
    assert model_cfg["arch"] == model_cfg["_name"] == "transformer"
    assert not any(key.startswith(("deepnorm", "residual_scheme", "admin")) for key in model_cfg)
    assert state["cfg"]["common"]["user_dir"] is None and model_cfg["user_dir"] is None
    record = record_from_model_config(OmegaConf.create(model_cfg))
    assert {side: entry["network"] for side, entry in record.items()} == {"encoder": "post-ln", "decoder": "post-ln"}
    original = load_checkpoint(trained)
    assert state["optimizer_history"][-1]["num_updates"] == original["optimizer_history"][-1]["num_updates"] == 30
    assert state["last_optimizer_state"] is None
    assert state["extra_state"]["deepnet_export"]["record"]["decoder"]["scheme"] == "deepnorm"


def test_stock_fairseq_generate_without_plugin(tiny_data, exported, original_generation) -> None:
    """fairseq-generate without --user-dir (the plugin never imported) on the exported file translates the
    test set exactly as fairseq-generate --user-dir does on the DeepNet checkpoint."""
    proc = run([sys.executable, "-c", STOCK_GENERATE, tiny_data, "--path", exported, *GENERATE])
    assert "PLUGIN-NOT-IMPORTED" in proc.stdout
    stock = parse_generation(proc.stdout)
    assert sorted(stock) == sorted(original_generation) == list(range(20))
    for i, (source, hypothesis, score, positional, _) in original_generation.items():
        assert stock[i][:2] == (source, hypothesis)
        assert stock[i][2] == pytest.approx(score, abs=1e-4)
        assert stock[i][3] == pytest.approx(positional, abs=1e-3)  # printed with 4 decimals


@pytest.fixture(scope="module")
def ct2_models(tiny_data, trained) -> Dict[str, Path]:
    root = trained.parent
    paths = {"float32": root / "ct2", "int8": root / "ct2_int8"}
    assert export_main(["--to", "ctranslate2", "--data", str(tiny_data), str(trained), str(paths["float32"])]) == 0
    assert export_main(["--to", "ctranslate2", "--data", str(tiny_data), "--quantization", "int8", str(trained),
                        str(paths["int8"])]) == 0
    return paths


def test_ctranslate2_reproduces_fairseq(ct2_models, tiny_data, trained, original_generation) -> None:
    """CTranslate2 (fp32 and int8 weights) gives fairseq-generate's beam-1 hypotheses on >= 95% of the test
    sentences, and fp32 scores the references with the DeepNet model's log-probs (<= 1e-4)."""
    import ctranslate2

    ids = sorted(original_generation)
    sources = [original_generation[i][0] for i in ids]
    references = [original_generation[i][4] for i in ids]
    for kind, path in ct2_models.items():
        translator = ctranslate2.Translator(str(path), device="cpu", compute_type=kind, intra_threads=1)
        results = translator.translate_batch(sources, beam_size=1, max_decoding_length=MAX_LEN)
        same = sum(r.hypotheses[0] == original_generation[i][1] for r, i in zip(results, ids, strict=True))
        assert same >= 0.95 * len(ids), f"{kind}: {same} of {len(ids)} hypotheses equal fairseq's"
    sizes = {kind: (path / "model.bin").stat().st_size for kind, path in ct2_models.items()}
    assert sizes["int8"] < 0.75 * sizes["float32"]  # the projections are stored as int8

    translator = ctranslate2.Translator(str(ct2_models["float32"]), device="cpu", intra_threads=1)
    scored = translator.score_batch(sources, references)
    (model,), _, task = checkpoint_utils.load_model_ensemble_and_task([str(trained)])
    model.eval()
    dictionary = task.source_dictionary
    for source, reference, result in zip(sources, references, scored, strict=True):
        src = torch.tensor([[dictionary.index(t) for t in source] + [dictionary.eos()]])
        target = [dictionary.index(t) for t in reference] + [dictionary.eos()]
        prev = torch.tensor([[dictionary.eos()] + target[:-1]])
        expected = log_probs(model, src, torch.tensor([src.shape[1]]), prev)[0, torch.arange(len(target)), target]
        assert result.log_probs == pytest.approx(expected.tolist(), abs=1e-4)


def test_torchscript_of_the_exported_model(exported, trained, tiny_data) -> None:
    """The stock model from the exported file scripts with ``torch.jit.script`` (model and beam search);
    the scripted search gives the DeepNet model's translations."""
    stock, _, task = load_stock(exported)
    scripted = torch.jit.script(stock)
    batch = padded_batch(task)
    with torch.no_grad():
        assert (scripted(*batch)[0] - stock(*batch)[0]).abs().max().item() <= 1e-5
    (original,), _, _ = checkpoint_utils.load_model_ensemble_and_task([str(trained)])
    original.eval()
    scripted_search = torch.jit.script(SequenceGenerator([stock], task.target_dictionary, beam_size=2,
                                                         max_len_b=MAX_LEN))
    eager_search = SequenceGenerator([original], task.target_dictionary, beam_size=2, max_len_b=MAX_LEN)
    sample = {"net_input": {"src_tokens": batch[0], "src_lengths": batch[1]}}
    with torch.no_grad():
        for ours, theirs in zip(scripted_search(sample), eager_search.generate([original], sample), strict=True):
            assert [h["tokens"].tolist() for h in ours] == [h["tokens"].tolist() for h in theirs]


def test_every_scheme_has_one_export_rule() -> None:
    """A new scheme must be classified (folded, copied or refused) before export accepts it."""
    assert sorted(known_schemes()) == sorted(SCHEME_NAMES)
    assert not (set(FOLDED) & set(AS_IS) or set(FOLDED) & set(REFUSED) or set(AS_IS) & set(REFUSED))


@pytest.mark.parametrize("scheme", sorted(REFUSED))
def test_refuses_schemes_fairseq_cannot_express(scheme, tiny_data) -> None:
    state = {"cfg": {"model": parse(tiny_data, *SMALL, "--residual-scheme", scheme)}, "model": {}}
    with pytest.raises(ExportError, match=f"--residual-scheme {scheme}, which fairseq's transformer cannot"):
        export_state(state)


def test_refusals_name_the_reason(tiny_data) -> None:
    """Other architectures, pruned layers, cross-self-attention, zero or missing residual weights, and tied
    tables that differ."""
    stock_args = parse(tiny_data, *SMALL)
    stock_args.arch = stock_args._name = "transformer"
    with pytest.raises(ExportError, match="--arch transformer: only deepnet_transformer"):
        export_state({"cfg": {"model": stock_args}, "model": {}})
    pruned = parse(tiny_data, *SMALL, "--deepnorm", "--encoder-layers-to-keep", "0")
    with pytest.raises(ExportError, match="--encoder-layers-to-keep"):
        export_state({"cfg": {"model": pruned}, "model": {}})

    crossed = parse(tiny_data, *SMALL, "--deepnorm", "--cross-self-attention")
    with pytest.raises(ExportError, match="--cross-self-attention: the decoder's self-attention also reads"):
        export_state({"cfg": {"model": crossed}, "model": {}})

    model, _, args = build(tiny_data, *SMALL, "--residual-scheme", "admin")
    weights = model.state_dict()
    weights["decoder.layers.1.admin_omega_ffn"][3] = 0.0
    with pytest.raises(ExportError, match="decoder layer 1 ffn: its residual weight has a zero entry"):
        residual_weights(record_from_model_config(args), weights, vars(args))
    del weights["encoder.layers.0.admin_omega_self_attn"]
    with pytest.raises(ExportError, match="no encoder.layers.0.admin_omega_self_attn, which --residual-scheme admin"):
        residual_weights(record_from_model_config(args), weights, vars(args))

    model, _, args = build(tiny_data, *SMALL, "--deepnorm", "--share-all-embeddings")
    state = checkpoint_state(args, model)
    state["model"]["decoder.output_projection.weight"] = state["model"]["decoder.output_projection.weight"] + 1
    with pytest.raises(ExportError, match="holds different values"):
        export_state(state)


@pytest.mark.parametrize("stored", ["absent", "false"])
def test_pre_ln_exported_when_the_stored_config_lacks_normalize_before(stored, tiny_data, tmp_path) -> None:
    """Under fairseq-hydra-train the Pre-LN scheme switches --*-normalize-before on in a copy of the stored
    configuration only: the export sets it from the residual-scheme record, so stock fairseq builds Pre-LN."""
    model, task, args = build(tiny_data, *SMALL, "--residual-scheme", "pre-ln")
    perturbed(model)
    state = checkpoint_state(args, model)
    stored_model = state["cfg"]["model"] = dict(vars(state["cfg"]["model"]))  # hydra stores a DictConfig
    for side in ("encoder", "decoder"):
        if stored == "absent":
            del stored_model[f"{side}_normalize_before"]
        else:
            stored_model[f"{side}_normalize_before"] = False
    torch.save(export_state(state), tmp_path / "exported.pt")
    stock, cfg, _ = load_stock(tmp_path / "exported.pt")
    assert cfg.model.encoder_normalize_before is True and cfg.model.decoder_normalize_before is True
    batch = padded_batch(task)
    assert (log_probs(model, *batch) - log_probs(stock, *batch)).abs().max().item() == 0.0


def test_sinusoidal_table_uses_the_dictionary_padding_index(tiny_data, tmp_path) -> None:
    """The exported position table is sized by the dictionary's padding index, not by the stored ``pad``
    (fairseq's BLEU scorer option, here 5)."""
    model, task, args = build(tiny_data, *SMALL, "--deepnorm", "--pad", "5")
    perturbed(model)
    exported = export_state(checkpoint_state(args, model))
    pad = task.source_dictionary.pad()
    assert exported["model"]["encoder.embed_positions.weight"].shape[0] == args.max_source_positions + pad + 1
    torch.save(exported, tmp_path / "exported.pt")
    stock, _, _ = load_stock(tmp_path / "exported.pt")
    batch = padded_batch(task)
    assert (log_probs(model, *batch) - log_probs(stock, *batch)).abs().max().item() <= 1e-5


def test_unknown_padding_index_refused(tiny_data) -> None:
    """A task whose dictionary's padding index the export cannot know: sinusoidal positions are refused,
    learned ones (scaled in place, no padding index needed) are exported."""
    model, _, args = build(tiny_data, *SMALL, "--deepnorm")
    state = checkpoint_state(args, model)
    state["cfg"]["task"]["_name"] = "my_task"
    with pytest.raises(ExportError, match="--task my_task: the export cannot tell the padding index"):
        export_state(state)
    model, _, args = build(tiny_data, *SMALL, "--deepnorm", "--encoder-learned-pos", "--decoder-learned-pos")
    state = checkpoint_state(args, model)
    state["cfg"]["task"]["_name"] = "my_task"
    assert export_state(state)["cfg"]["model"]["encoder_learned_pos"] is True


def test_config_without_layer_counts_refused(tiny_data) -> None:
    """No integer --encoder-layers/--decoder-layers: no record can be computed; the error names the file."""
    config = vars(parse(tiny_data, *SMALL, "--deepnorm"))
    config.update(encoder_layers="2", decoder_layers=None)
    with pytest.raises(ExportError, match=r"ckpt\.pt: its model configuration has no integer layer count "
                                          r"\(--encoder-layers='2', --decoder-layers=None\)"):
        export_state({"cfg": {"model": config}, "model": {}}, source="ckpt.pt")


def test_cli_errors(tiny_data, trained, tmp_path, capsys) -> None:
    """Flags of the other target, a missing --data, an existing output directory, a refused scheme."""
    with pytest.raises(SystemExit) as exit_:
        export_main(["--to", "fairseq", "--data", str(tiny_data), str(trained), str(tmp_path / "x.pt")])
    assert exit_.value.code == 2 and "--data only apply with --to ctranslate2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main(["--to", "ctranslate2", str(trained), str(tmp_path / "ct2")])
    assert "--to ctranslate2 needs --data" in capsys.readouterr().err
    (tmp_path / "ct2").mkdir()
    assert export_main(["--to", "ctranslate2", "--data", str(tiny_data), str(trained), str(tmp_path / "ct2")]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert export_main(["--to", "fairseq", str(trained), str(trained)]) == 1
    assert "is the input checkpoint" in capsys.readouterr().err

    refused = tmp_path / "tfixup.pt"
    torch.save({"cfg": {"model": parse(tiny_data, *SMALL, "--residual-scheme", "t-fixup")}, "model": {}}, refused)
    assert export_main(["--to", "fairseq", str(refused), str(tmp_path / "out.pt")]) == 1
    assert "t-fixup, which fairseq's transformer cannot express: it has no LayerNorm" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


LM_SMALL = ("--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
            "--decoder-attention-heads", "2", "--tokens-per-sample", "64")
SAME_DIMS = ("--decoder-input-dim", "32", "--decoder-output-dim", "32")
LM_CASES = {
    # name: (flags, output projection still tied to the token table?)
    "deepnorm-projected-input": (("--deepnorm", "--share-decoder-input-output-embed"), True),
    "deepnorm-tied": (("--deepnorm", "--share-decoder-input-output-embed", *SAME_DIMS), False),
    "admin-learned-positions": (("--residual-scheme", "admin", "--decoder-learned-pos", *SAME_DIMS), False),
    # deepnet_lm is a dataclass model: --decoder-normalize-before is switched on in a copy, not in the stored cfg
    "pre-ln": (("--residual-scheme", "pre-ln"), False),
    "pre-ln-no-final-norm": (("--residual-scheme", "pre-ln", "--no-decoder-final-norm"), False),
}


@pytest.fixture(scope="module")
def lm_data(tiny_data, tmp_path_factory) -> Path:
    """A language-model data directory: the tiny dictionary as dict.txt."""
    root = tmp_path_factory.mktemp("export_lm_data")
    shutil.copy(tiny_data / "dict.src.txt", root / "dict.txt")
    return root


def build_lm(data: Path, *flags: str) -> Tuple[torch.nn.Module, object, argparse.Namespace]:
    model, task, args = build_from_command_line([data, "--arch", "deepnet_lm", "--cpu", *LM_SMALL, *flags],
                                                task="language_modeling")
    return model.eval(), task, args


def lm_tokens(task) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return torch.randint(task.dictionary.nspecial, len(task.dictionary), (3, 11), generator=generator)


@pytest.mark.parametrize("case", list(LM_CASES))
def test_language_model_export(case, lm_data, tmp_path) -> None:
    """deepnet_lm is exported as fairseq's transformer_lm with the same log-probs (fp32, <= 1e-5); a
    --decoder-input-dim projection carries the scale, so the token table can stay tied."""
    flags, tied = LM_CASES[case]
    model, task, args = build_lm(lm_data, *flags)
    perturbed(model)
    torch.save(export_state(checkpoint_state(args, model)), tmp_path / "exported.pt")
    stock, cfg, _ = load_stock(tmp_path / "exported.pt")
    assert type(stock) is TransformerLanguageModel
    assert cfg.model._name == "transformer_lm"
    assert cfg.model.share_decoder_input_output_embed == tied
    tokens = lm_tokens(task)
    with torch.no_grad():
        ours = model.get_normalized_probs(model(tokens), log_probs=True)
        theirs = stock.get_normalized_probs(stock(tokens), log_probs=True)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert cfg.model.decoder_normalize_before == ("pre-ln" in flags)


def test_language_model_to_ctranslate2(lm_data, tmp_path) -> None:
    """CTranslate2's Generator scores text with the deepnet_lm model's log-probs (it starts from </s>)."""
    import ctranslate2

    model, task, args = build_lm(lm_data, "--deepnorm", "--share-decoder-input-output-embed", *SAME_DIMS)
    perturbed(model)
    torch.save(checkpoint_state(args, model), tmp_path / "lm.pt")
    assert export_main(["--to", "ctranslate2", "--data", str(lm_data), str(tmp_path / "lm.pt"),
                        str(tmp_path / "ct2")]) == 0
    tokens = lm_tokens(task)
    dictionary = task.dictionary
    scored = ctranslate2.Generator(str(tmp_path / "ct2"), intra_threads=1).score_batch(
        [["</s>"] + [dictionary[int(t)] for t in row] for row in tokens])
    prefixed = torch.cat([torch.full((len(tokens), 1), dictionary.eos()), tokens], dim=1)
    with torch.no_grad():
        expected = model.get_normalized_probs(model(prefixed[:, :-1]), log_probs=True)
    expected = expected.gather(-1, prefixed[:, 1:].unsqueeze(-1)).squeeze(-1)
    for result, row in zip(scored, expected, strict=True):
        assert result.log_probs == pytest.approx(row.tolist(), abs=1e-4)


def test_language_model_refusals(lm_data) -> None:
    """fairseq's NormFormer options: stock fairseq could not load its own checkpoint with them."""
    _, _, args = build_lm(lm_data, "--deepnorm", "--scale-resids", "--scale-attn")
    with pytest.raises(ExportError, match="--scale-attn, --scale-resids: stock fairseq's transformer_lm loses"):
        export_state({"cfg": {"model": vars(args)}, "model": {}})
