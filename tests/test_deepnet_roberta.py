"""``deepnet_roberta``: encoder-only DeepNorm (alpha = (2N)^(1/4), beta = (8N)^(-1/4)) in fairseq's
RoBERTa, pre-trained with ``--task masked_lm``, fine-tuned with ``--task sentence_prediction`` and used
through the hub, on character-level text made from the bundled Tatoeba German-English sample.

One tiny (2 layers, d=32) pre-training run and one fine-tuning run are shared by the module's tests;
both run in this process.
"""

from __future__ import annotations

import gzip
import json
import math
import random
from pathlib import Path

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.data.encoders.characters import Characters
from fairseq.models.roberta import RobertaModel

import deepnet_fairseq  # noqa: F401
from conftest import REPO, USER_DIR, causes, fairseq_main, logged_updates
from deepnet_fairseq.build import parse_command_line
from deepnet_fairseq.divergence import DIVERGED_EXIT_CODE
from deepnet_fairseq.models.deepnet_roberta import DeepNetRobertaModel
from deepnet_fairseq.scheme_record import (
    RECORD_ATTRIBUTE,
    SchemeMismatchError,
    attach_record,
    record_from_model_config,
)
from deepnet_fairseq.schemes import SCHEME_NAMES, DeepNetConfigError
from modelkit import build, check_ln_inputs, pooled_std, xavier_std

pytestmark = pytest.mark.xdist_group("test_deepnet_roberta")

TATOEBA = REPO / "data" / "tatoeba-deu-eng" / "deu-eng.tsv.gz"
MAX_CHARS = 60  # sentences that fit --tokens-per-sample / --max-positions 64 with <s> and </s>
TINY = ("--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
        "--encoder-attention-heads", "2")
COMMON = ("--user-dir", USER_DIR, "--optimizer", "adam", "--cpu", "--seed", "1", "--no-progress-bar",
          "--log-format", "json", "--log-interval", "1", "--num-workers", "0", "--no-epoch-checkpoints")
PRETRAIN_UPDATES = 40
FINETUNE_UPDATES = 40


def encoder_only(n):
    """DeepNorm's encoder-only (alpha, beta) for N layers."""
    return (2 * n) ** 0.25, (8 * n) ** -0.25


def _write(path: Path, lines) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Character-level (fairseq's ``characters`` BPE) German and English sentences, binarized for masked_lm
    (``mlm``) and for sentence classification German/English (``cls``: ``input0`` with the pre-training
    dictionary, ``label``); ``held_out`` are labelled sentences in neither."""
    root = tmp_path_factory.mktemp("roberta_corpus")
    with gzip.open(TATOEBA, "rt", encoding="utf-8") as handle:
        pairs = [line.split("\t")[:2] for line in handle]
    pairs = [(en, de) for en, de in pairs if len(en) <= MAX_CHARS and len(de) <= MAX_CHARS]
    random.Random(0).shuffle(pairs)
    labelled = [(s, lang) for en, de in pairs[:700] for s, lang in ((en, "en"), (de, "de"))]
    pretrain, classify, held_out = labelled[:800], labelled[800:1300], labelled[1300:1400]
    chars = {name: [Characters.encode(s) for s, _ in rows] for name, rows in
             (("train", pretrain[:700]), ("valid", pretrain[700:]), ("cls_train", classify[:400]),
              ("cls_valid", classify[400:]))}
    for name, lines in chars.items():
        _write(root / f"{name}.txt", lines)
    _write(root / "cls_train.label", [lang for _, lang in classify[:400]])
    _write(root / "cls_valid.label", [lang for _, lang in classify[400:]])
    mlm, cls = root / "mlm-bin", root / "cls-bin"
    fairseq_main("preprocess", ["--only-source", "--trainpref", root / "train.txt", "--validpref", root / "valid.txt",
                                "--destdir", mlm, "--workers", "1"])
    fairseq_main("preprocess", ["--only-source", "--trainpref", root / "cls_train.txt", "--validpref",
                                root / "cls_valid.txt", "--destdir", cls / "input0", "--srcdict", mlm / "dict.txt",
                                "--workers", "1"])
    fairseq_main("preprocess", ["--only-source", "--trainpref", root / "cls_train.label", "--validpref",
                                root / "cls_valid.label", "--destdir", cls / "label", "--workers", "1"])
    return {"mlm": mlm, "cls": cls, "held_out": held_out}


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    """``fairseq-train --task masked_lm --arch deepnet_roberta_tiny --deepnorm`` (2 layers, d=32)."""
    save = tmp_path_factory.mktemp("roberta_pretrain")
    _, log = fairseq_main("train", [corpus["mlm"], "--task", "masked_lm", "--criterion", "masked_lm",
                                    "--arch", "deepnet_roberta_tiny", "--deepnorm", *TINY, "--tokens-per-sample", "64",
                                    "--lr", "3e-3", "--max-tokens", "1024", "--max-update", str(PRETRAIN_UPDATES),
                                    "--save-dir", save, *COMMON])
    return save, log


def finetune_args(corpus, pretrained_dir: Path, save: Path, *extra) -> list:
    return [corpus["cls"], "--task", "sentence_prediction", "--criterion", "sentence_prediction",
            "--num-classes", "2", "--init-token", "0", "--separator-token", "2", "--max-positions", "64",
            "--restore-file", pretrained_dir / "checkpoint_last.pt", "--reset-optimizer", "--reset-dataloader",
            "--reset-meters", "--arch", "deepnet_roberta_tiny", *TINY, "--lr", "3e-3", "--batch-size", "16",
            "--best-checkpoint-metric", "accuracy", "--maximize-best-checkpoint-metric", "--save-dir", save,
            *COMMON, *extra]


@pytest.fixture(scope="module")
def finetuned(corpus, pretrained, tmp_path_factory):
    """``--task sentence_prediction`` (German or English?) from the pre-trained checkpoint."""
    save = tmp_path_factory.mktemp("roberta_finetune")
    _, log = fairseq_main("train", finetune_args(corpus, pretrained[0], save, "--deepnorm",
                                                 "--max-update", str(FINETUNE_UPDATES)))
    return save, log


def build_mlm(corpus, *flags, arch="deepnet_roberta_tiny"):
    return build(corpus["mlm"], *flags, task_name="masked_lm", arch=arch)


def tokens(task, n=3, length=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(task.dictionary.nspecial, len(task.dictionary) - 1, (n, length), generator=gen)


# ---------------------------------------------------------------------------------------------------
# the paper's encoder-only DeepNorm


@pytest.mark.parametrize("n", [2, 3])
def test_ln_input_is_alpha_x_plus_branch_with_encoder_only_alpha(corpus, n):
    model, task = build_mlm(corpus, "--deepnorm", *TINY, "--encoder-layers", n)
    layers = model.encoder.sentence_encoder.layers
    alpha, _ = encoder_only(n)
    checked = check_ln_inputs(layers, lambda: model(tokens(task)), alpha, {"self"})
    assert checked == 2 * n
    assert model.residual_scheme_record == {
        "encoder": {"scheme": "deepnorm", "network": "deepnorm", "alpha": pytest.approx(alpha),
                    "init": {"beta": pytest.approx(encoder_only(n)[1]), "init": "paper"}}}


def test_plain_model_adds_x_and_branch(corpus):
    model, task = build_mlm(corpus, *TINY)
    assert check_ln_inputs(model.encoder.sentence_encoder.layers, lambda: model(tokens(task)), 1.0, {"self"}) == 4


def test_deepnorm_init_is_beta_scaled_xavier_normal(corpus):
    n = 4
    model, _ = build_mlm(corpus, "--deepnorm", *TINY, "--encoder-layers", n)
    layers = model.encoder.sentence_encoder.layers
    _, beta = encoder_only(n)
    for name, gain in (("fc1", beta), ("fc2", beta), ("self_attn.v_proj", beta), ("self_attn.out_proj", beta),
                       ("self_attn.q_proj", 1.0), ("self_attn.k_proj", 1.0)):
        expected = xavier_std(layers[0].get_submodule(name), gain)
        assert pooled_std(layers, name) == pytest.approx(expected, rel=0.05), name
        weights = torch.cat([layer.get_submodule(name).weight.detach().flatten() for layer in layers])
        standardized = (weights - weights.mean()) / weights.std()
        excess_kurtosis = standardized.pow(4).mean().item() - 3.0
        assert abs(excess_kurtosis) < 0.4, f"{name}: not normal (uniform has -1.2)"
        for layer in layers:
            assert torch.count_nonzero(layer.get_submodule(name).bias) == 0, name


def test_plain_model_starts_from_robertas_bert_init(corpus):
    model, _ = build_mlm(corpus, *TINY, "--encoder-layers", 4)
    layers = model.encoder.sentence_encoder.layers
    for name in ("fc1", "fc2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
        assert pooled_std(layers, name) == pytest.approx(0.02, rel=0.05), name
    assert model.encoder.sentence_encoder.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.encoder.lm_head.dense.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_stack_hooks_act_on_robertas_init(corpus):
    """T-Fixup scales the token embeddings that RoBERTa initialised (N(0, 0.02)), not the other way round."""
    n = 4
    model, _ = build_mlm(corpus, "--residual-scheme", "t-fixup", *TINY, "--encoder-layers", n)
    table = model.encoder.sentence_encoder.embed_tokens.weight.detach()
    assert table.std().item() == pytest.approx(0.02 * (9 * n) ** -0.25, rel=0.1)
    assert model.encoder.lm_head.weight is model.encoder.sentence_encoder.embed_tokens.weight


def test_plain_deepnet_roberta_is_bit_identical_to_fairseq_roberta(corpus):
    stock, task = build_mlm(corpus, *TINY, "--encoder-attention-heads", "2", arch="roberta")
    ours, _ = build_mlm(corpus, *TINY)
    assert type(stock).__name__ == "RobertaModel" and type(ours) is DeepNetRobertaModel
    assert stock.state_dict().keys() == ours.state_dict().keys()
    torch.manual_seed(1)
    for p in stock.parameters():  # make sure nothing matches by accident of a shared seed
        p.data.normal_(0, 0.1)
    ours.load_state_dict(stock.state_dict(), strict=True)
    batch = tokens(task)
    with torch.no_grad():
        a, _ = stock(batch)
        b, _ = ours(batch)
        features_a, extra_a = stock.extract_features(batch, return_all_hiddens=True)
        features_b, extra_b = ours.extract_features(batch, return_all_hiddens=True)
    assert torch.equal(a, b) and torch.equal(features_a, features_b)
    assert all(torch.equal(x, y) for x, y in zip(extra_a["inner_states"], extra_b["inner_states"], strict=True))
    torch.manual_seed(2)
    for p in ours.parameters():
        p.data.normal_(0, 0.1)
    stock.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(stock(batch)[0], ours(batch)[0])


def test_layernorm_embedding_and_layer_norm_placement_per_scheme(corpus):
    expectations = {"post-ln": (True, False), "deepnorm": (True, False), "pre-ln": (False, True),
                    "sub-ln": (False, True), "t-fixup": (False, False), "rezero": (False, False)}
    for scheme, (embedding_ln, normalize_before) in expectations.items():
        model, _ = build_mlm(corpus, "--residual-scheme", scheme, *TINY)
        stack = model.encoder.sentence_encoder
        assert (stack.layernorm_embedding is not None) == embedding_ln, scheme
        assert stack.layers[0].normalize_before == normalize_before, scheme
        assert (stack.layer_norm is not None) == normalize_before, scheme
    model, _ = build_mlm(corpus, "--residual-scheme", "pre-ln", "--layernorm-embedding", *TINY)
    assert model.encoder.sentence_encoder.layernorm_embedding is not None


@pytest.mark.parametrize(
    "flags,needle",
    [
        (("--residual-scheme", "t-fixup", "--layernorm-embedding"), "remove --layernorm-embedding"),
        (("--deepnorm", "--encoder-normalize-before"), "remove --encoder-normalize-before"),
        (("--deepnorm", "--deepnorm-alpha", "1.2,1.5"), "--deepnorm-alpha takes one value for a model with only"),
        (("--deepnorm", "--deepnorm-beta", "0.5,0.7"), "--deepnorm-beta takes one value for a model with only"),
        (("--deepnorm", "--residual-scheme", "pre-ln"), "--deepnorm contradicts --residual-scheme pre-ln"),
    ],
)
def test_contradictory_flags_are_refused(corpus, flags, needle):
    with pytest.raises(DeepNetConfigError) as info:
        build_mlm(corpus, *TINY, *flags)
    assert needle in str(info.value)


def test_deepnorm_alpha_override_applies_to_the_encoder(corpus):
    model, task = build_mlm(corpus, "--deepnorm", "--deepnorm-alpha", "2.5", *TINY)
    assert check_ln_inputs(model.encoder.sentence_encoder.layers, lambda: model(tokens(task)), 2.5, {"self"}) == 4


def test_every_scheme_builds_and_trains_one_step(corpus):
    for scheme in SCHEME_NAMES:
        model, task = build_mlm(corpus, "--residual-scheme", scheme, *TINY)
        record = model.residual_scheme_record
        assert set(record) == {"encoder"} and record["encoder"]["scheme"] == scheme
        model.train()
        logits, _ = model(tokens(task))
        logits.float().logsumexp(-1).mean().backward()
        grads = [p.grad for p in model.encoder.sentence_encoder.layers.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), scheme


def test_admin_profiles_on_the_first_training_forward(corpus):
    model, task = build_mlm(corpus, "--residual-scheme", "admin", *TINY)
    layers = model.encoder.sentence_encoder.layers
    assert all(float(layer.admin_profiled) == 0.0 for layer in layers)
    model.train()
    model(tokens(task))
    assert all(float(layer.admin_profiled) == 1.0 for layer in layers)
    omegas = [layer.admin_omega_self_attn.detach().clone() for layer in layers]
    assert not torch.equal(omegas[1], torch.ones_like(omegas[1]))  # the ratio grew through the stack
    model(tokens(task, seed=1))  # profiled once only
    assert all(torch.equal(a, layer.admin_omega_self_attn) for a, layer in zip(omegas, layers, strict=True))


def test_log_stability_and_divergence_patience_in_masked_lm_training(corpus, tmp_path, monkeypatch):
    """``--log-stability`` measures every encoder sub-layer; ``--stop-on-divergence-patience`` stops a run
    whose loss turns NaN at update 4 with exit code 3 and a report naming the encoder-only model."""
    original = DeepNetRobertaModel.build_model.__func__
    training_forwards = []

    def nan_from_the_fourth(module, args, output):
        if module.training:
            training_forwards.append(1)
            if len(training_forwards) >= 4:
                return output * float("nan")
        return None

    def build_model(cls, args, task):
        model = original(cls, args, task)
        model.encoder.sentence_encoder.layers[0].register_forward_hook(nan_from_the_fourth)
        return model

    monkeypatch.setattr(DeepNetRobertaModel, "build_model", classmethod(build_model))
    code, log = fairseq_main("train", [corpus["mlm"], "--task", "masked_lm", "--criterion", "masked_lm",
                                       "--arch", "deepnet_roberta_tiny", "--deepnorm", *TINY,
                                       "--tokens-per-sample", "64", "--lr", "3e-3", "--max-tokens", "1024",
                                       "--max-update", "10", "--no-save", "--disable-validation", "--save-dir",
                                       tmp_path, "--log-stability", "--stability-interval", "2",
                                       "--stop-on-divergence-patience", "1", *COMMON], check=False)
    assert code == DIVERGED_EXIT_CODE
    records = {}
    for line in log.splitlines():
        if "train_inner" in line and "{" in line:
            record = json.loads(line[line.find("{"):])
            records[int(record["num_updates"])] = record
    assert sorted(records) == [1, 2, 3]
    measured = {f"stab_enc{i:02d}_{s}_{q}" for i in (1, 2) for s in ("self_attn", "ffn")
                for q in ("ln", "ratio", "gnorm")}
    for update in (1, 3):  # updates 0 and 2 are measured (logged as 1 and 3)
        assert measured | {"stab_update", "stab_ln_max", "stab_ratio_max"} <= set(records[update]), update
        assert all(math.isfinite(float(records[update][key])) for key in measured)
    assert float(records[1]["stab_update"]) == 0.0 and float(records[3]["stab_update"]) > 0
    assert all(value is None for key, value in records[2].items() if key.startswith("stab_"))  # not measured
    (report,) = [line for line in log.splitlines() if "Training diverged at update 4" in line]
    assert f"(2L, scheme deepnorm(alpha={encoder_only(2)[0]:.4f}" in report
    assert "--residual-scheme deepnorm" not in report


def test_encoder_layers_to_keep_keeps_the_trained_constants(corpus):
    model, task = build_mlm(corpus, "--deepnorm", *TINY, "--encoder-layers", 4, "--encoder-layers-to-keep", "0,2")
    layers = model.encoder.sentence_encoder.layers
    assert len(layers) == 2
    assert check_ln_inputs(layers, lambda: model(tokens(task)), encoder_only(4)[0], {"self"}) == 4


# ---------------------------------------------------------------------------------------------------
# fairseq-train / fairseq-validate / fine-tuning / hub


def test_masked_lm_pretraining_loss_decreases(pretrained):
    save, log = pretrained
    losses = logged_updates(log)
    assert sorted(losses) == list(range(1, PRETRAIN_UPDATES + 1))
    assert all(math.isfinite(v) for v in losses.values())
    first = sum(losses[u] for u in (1, 2, 3)) / 3
    last = sum(losses[u] for u in range(PRETRAIN_UPDATES - 2, PRETRAIN_UPDATES + 1)) / 3
    assert last < first - 1.0, (first, last)
    assert f"deepnet_roberta 2L: deepnorm(alpha={encoder_only(2)[0]:.4f}, beta={encoder_only(2)[1]:.4f}" in log
    assert (save / "checkpoint_last.pt").exists()


def test_checkpoint_record_is_encoder_only_deepnorm(pretrained):
    state = checkpoint_utils.load_checkpoint_to_cpu(str(pretrained[0] / "checkpoint_last.pt"))
    record = getattr(state["model"], RECORD_ATTRIBUTE)
    assert set(record) == {"encoder"}
    assert record["encoder"]["network"] == "deepnorm"
    assert record["encoder"]["alpha"] == pytest.approx(encoder_only(2)[0])


def test_fairseq_validate_reproduces_the_training_validation_loss(corpus, pretrained, monkeypatch):
    from fairseq_cli import validate

    # fairseq-validate's reset_logging() drops root handlers (under pytest, the one collecting its log too)
    monkeypatch.setattr(validate, "reset_logging", lambda: None)
    save, _ = pretrained
    _, log = fairseq_main("validate", [corpus["mlm"], "--path", save / "checkpoint_last.pt", "--task", "masked_lm",
                                       "--user-dir", USER_DIR, "--cpu", "--max-tokens", "1024", "--num-workers", "0",
                                       "--log-format", "json"])
    (line,) = [line for line in log.splitlines() if line.startswith("valid | {")]
    validated = float(json.loads(line[len("valid | "):])["valid_loss"])
    state = checkpoint_utils.load_checkpoint_to_cpu(str(save / "checkpoint_last.pt"))
    assert math.isfinite(validated)
    assert validated == pytest.approx(state["extra_state"]["val_loss"], rel=1e-3)


def test_finetune_sentence_prediction_from_the_pretrained_checkpoint(corpus, pretrained, finetuned):
    save, log = finetuned
    assert f"Loaded checkpoint {pretrained[0] / 'checkpoint_last.pt'}" in log
    losses = logged_updates(log)
    assert sorted(losses) == list(range(1, FINETUNE_UPDATES + 1))
    assert all(math.isfinite(v) for v in losses.values())
    state = checkpoint_utils.load_checkpoint_to_cpu(str(save / "checkpoint_best.pt"))
    assert "classification_heads.sentence_classification_head.out_proj.weight" in state["model"]
    assert state["extra_state"]["val_loss"] >= 70.0  # best validation accuracy in percent (chance: 50)


def test_finetune_without_the_pretrained_scheme_is_refused(corpus, pretrained, tmp_path):
    with pytest.raises(Exception) as info:
        fairseq_main("train", finetune_args(corpus, pretrained[0], tmp_path, "--max-update", "1"))
    text = causes(info.value)
    assert "SchemeMismatchError" in text
    assert "trained with encoder deepnorm(alpha=1.41421" in text and "built with encoder post-ln" in text


def test_hub_fill_mask_and_extract_features(corpus, pretrained):
    hub = RobertaModel.from_pretrained(str(pretrained[0]), checkpoint_file="checkpoint_last.pt",
                                       data_name_or_path=str(corpus["mlm"]), bpe="characters")
    assert type(hub.model) is DeepNetRobertaModel
    assert hub.model.residual_scheme_record["encoder"]["alpha"] == pytest.approx(encoder_only(2)[0])
    hub.eval()
    filled = hub.fill_mask("Ich habe k<mask>ine Zeit.", topk=3)
    assert len(filled) == 3
    probabilities = [p for _, p, _ in filled]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1
    for sentence, _, token in filled:
        assert sentence == f"Ich habe k{token}ine Zeit."
    # the answer is the model's own distribution at the masked position
    masked = hub.task.source_dictionary.encode_line(
        "<s> " + Characters.encode("Ich habe k") + " <mask> " + Characters.encode("ine Zeit.") + " </s>",
        append_eos=False, add_if_not_exist=False).long().unsqueeze(0)
    with torch.no_grad():
        logits, _ = hub.model(masked)
    position = int((masked[0] == hub.task.mask_idx).nonzero())
    assert probabilities[0] == pytest.approx(logits[0, position].softmax(-1).max().item(), rel=1e-5)

    encoded = hub.encode("Hallo Welt")
    assert encoded.tolist()[0] == hub.task.source_dictionary.bos() and len(encoded) == len("Hallo Welt") + 2
    features = hub.extract_features(encoded)
    hiddens = hub.extract_features(encoded, return_all_hiddens=True)
    assert features.shape == (1, len(encoded), 32)
    assert len(hiddens) == 3 and torch.equal(hiddens[-1], features)


def test_hub_predicts_the_language_after_finetuning(corpus, finetuned):
    hub = RobertaModel.from_pretrained(str(finetuned[0]), checkpoint_file="checkpoint_best.pt",
                                       data_name_or_path=str(corpus["cls"]), bpe="characters")
    hub.eval()
    labels = hub.task.label_dictionary
    right = 0
    for sentence, language in corpus["held_out"]:
        log_probs = hub.predict("sentence_classification_head", hub.encode(sentence))
        assert log_probs.shape == (1, 2)
        right += labels.string([log_probs.argmax().item() + labels.nspecial]) == language
    assert right / len(corpus["held_out"]) >= 0.7  # chance: 0.5


# ---------------------------------------------------------------------------------------------------
# scheme records: stock roberta checkpoints and deepnet_roberta ones


def _parsed(corpus, arch, *flags):
    return parse_command_line([corpus["mlm"], "--arch", arch, *TINY, *flags], task="masked_lm")


def test_stock_roberta_configs_have_a_native_encoder_record(corpus):
    post = {"encoder": {"scheme": "post-ln", "network": "post-ln", "init": {}}}
    assert record_from_model_config(_parsed(corpus, "roberta")) == {"encoder": {**post["encoder"], "stock": True}}
    assert record_from_model_config(_parsed(corpus, "roberta_prenorm")) == {
        "encoder": {"scheme": "pre-ln", "network": "pre-ln", "init": {}, "stock": True}}
    assert record_from_model_config(_parsed(corpus, "deepnet_roberta_tiny")) == post
    deepnorm = record_from_model_config(_parsed(corpus, "deepnet_roberta_tiny", "--deepnorm"))
    assert set(deepnorm) == {"encoder"} and deepnorm["encoder"]["alpha"] == pytest.approx(encoder_only(2)[0])


def _stamped(model, cfg) -> dict:
    state = {"args": None, "cfg": {"model": cfg}, "model": model.state_dict()}
    attach_record(state, record_from_model_config(cfg), None)
    return state["model"]


def test_stock_roberta_and_plain_deepnet_roberta_load_each_other_deepnorm_is_refused(corpus):
    stock_cfg, plain_cfg = _parsed(corpus, "roberta"), _parsed(corpus, "deepnet_roberta_tiny")
    deepnorm_cfg = _parsed(corpus, "deepnet_roberta_tiny", "--deepnorm")
    stock, _ = build_mlm(corpus, *TINY, arch="roberta")
    plain, _ = build_mlm(corpus, *TINY)
    deepnorm, _ = build_mlm(corpus, "--deepnorm", *TINY)
    plain.load_state_dict(_stamped(stock, stock_cfg), strict=True, model_cfg=plain_cfg)
    stock.load_state_dict(_stamped(plain, plain_cfg), strict=True, model_cfg=stock_cfg)
    with pytest.raises(SchemeMismatchError, match="fairseq's own RobertaModel cannot compute"):
        stock.load_state_dict(_stamped(deepnorm, deepnorm_cfg), strict=True, model_cfg=stock_cfg)
    with pytest.raises(SchemeMismatchError, match="built with encoder post-ln"):
        plain.load_state_dict(_stamped(deepnorm, deepnorm_cfg), strict=True, model_cfg=plain_cfg)
    with pytest.raises(SchemeMismatchError, match="trained with encoder post-ln"):
        deepnorm.load_state_dict(_stamped(stock, stock_cfg), strict=True, model_cfg=deepnorm_cfg)
