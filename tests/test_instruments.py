"""--log-stability: values equal to direct computations; no extra work when off."""

from __future__ import annotations

import sys

import pytest
import torch
from fairseq.logging import metrics

import deepnet_fairseq  # noqa: F401
from conftest import train_args
from deepnet_fairseq.analysis.instruments import decoder_features
from modelkit import build, sample_batch


def _net_input(task):
    src, lengths, prev = sample_batch(task, n=5, src_len=8, tgt_len=7)
    src[0, :2] = task.source_dictionary.pad()  # left padding, as fairseq batches it
    lengths[0] = 6
    return {"src_tokens": src, "src_lengths": lengths, "prev_output_tokens": prev}


def test_instruments_equal_direct_computation(tiny_data):
    model, task = build(tiny_data, "--deepnorm", "--encoder-layers", 2, "--decoder-layers", 2, "--dropout", 0,
                        "--log-stability", "--stability-interval", 1)
    monitor = model.stability_monitor
    net_input = _net_input(task)
    layer = model.decoder.layers[1]
    seen = {}
    hooks = [
        layer.encoder_attn_layer_norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("ln_in", a[0].clone())),
        layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone())),
        layer.self_attn.register_forward_hook(lambda m, a, o: seen.__setitem__("g", o[0].clone())),
    ]
    model.train()
    with metrics.aggregate(new_root=True) as agg:
        out, _ = model(**net_input)
        out.float().logsumexp(-1).mean().backward()
        logged = {k: v.avg for k, v in agg.items()}
    for h in hooks:
        h.remove()
    # LN input norm ||x|| / sqrt(d) per token, mean over the decoder's (unpadded) tokens
    direct_ln = (seen["ln_in"].pow(2).mean(-1).sqrt()).mean().item()
    assert logged["stab_dec02_encoder_attn_ln"] == pytest.approx(direct_ln, rel=1e-3)
    direct_ratio = (seen["g"].norm(dim=-1) / seen["x"].norm(dim=-1)).mean().item()
    assert logged["stab_dec02_self_attn_ratio"] == pytest.approx(direct_ratio, rel=1e-3)
    grads = [p.grad for p in list(layer.fc1.parameters()) + list(layer.fc2.parameters())]
    direct_gnorm = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
    assert logged["stab_dec02_ffn_gnorm"] == pytest.approx(direct_gnorm, rel=1e-3)
    # encoder layer 1 sees padding (zero vectors): only real tokens count
    assert 0 < logged["stab_enc01_self_attn_ratio"] < 100
    assert logged["stab_update"] == 0.0  # theta_0 is the reference
    # model update after a parameter change: ||F(x; theta_t) - F(x; theta_0)|| on the probe batch
    model.eval()
    with torch.no_grad():
        before = decoder_features(model, net_input)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        after = decoder_features(model, net_input)
    direct_update = (after - before).norm(dim=-1).mean().item()
    model.train()
    with metrics.aggregate(new_root=True) as agg:
        model(**_net_input(task))  # another batch: the probe stays the first one
        assert agg["stab_update"].avg == pytest.approx(direct_update, rel=1e-3)
    assert monitor.probe["src_tokens"].equal(net_input["src_tokens"])


def _count_encoder_forwards(tiny_data, save, monkeypatch, *flags):
    from fairseq.models.transformer import TransformerEncoderBase
    from fairseq_cli import train

    calls = {"n": 0}
    original = TransformerEncoderBase.forward

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TransformerEncoderBase, "forward", counting)
    argv = train_args(tiny_data, save, "--deepnorm", "--max-update", "4", "--disable-validation", *flags)[1:]
    monkeypatch.setattr(sys, "argv", ["fairseq-train", *map(str, argv)])
    train.cli_main()
    return calls["n"]


def test_no_extra_forward_passes_when_off(tiny_data, tmp_path, monkeypatch):
    off = _count_encoder_forwards(tiny_data, tmp_path / "off", monkeypatch)
    on = _count_encoder_forwards(tiny_data, tmp_path / "on", monkeypatch, "--log-stability",
                                 "--stability-interval", "2")
    assert off == 4  # one forward per update, nothing else
    assert on == 4 + 2  # plus one probe forward at updates 0 and 2
