"""Every residual scheme's formulas (its README table row and module docstring), checked on every place
they apply: encoder and decoder, self- and cross-attention and FFN, decoder-only LMs, each option value.

* Sub-layer formulas: each layer's output is recomputed here from the layer's parameters with plain
  tensor maths (attention from q/k/v/out weights, ``F.layer_norm``, ...), after every trainable
  parameter has been set to distinct random values (so a scale, shift, LayerNorm or head scale used in
  the wrong place, or not at all, changes the result).  The gradients of the real layer with respect to
  its input, the encoder output and every trainable parameter must equal the recomputation's.
* Init: every attention/FFN weight of every layer against its expected distribution (family and scale
  from the paper's formula, computed here), biases, the schemes' extra parameters and the embeddings.
  DeepNorm's and Sandwich-LN's normal inits are also checked for shape (Kolmogorov-Smirnov on the pooled,
  standardised weights), so a uniform init of the same variance fails.
* Structure: which parameters each scheme adds or removes, and the stacks' final LayerNorm.

Constants are computed from the papers' formulas, never read from the schemes' code.  Models are tiny
(3L-2L or 2L decoder-only, d=32) and built in-process; nothing is trained.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor, nn

from deepnet_fairseq.schemes import DeepNetConfigError
from modelkit import build, capture, paper_constants, residual_io, sample_batch, xavier_std

N, M = 3, 2  # encoder / decoder layers of the encoder-decoder models
LM_LAYERS = 2
DIM, FFN_DIM, HEADS = 32, 64, 2
SIZE_FLAGS = ("--encoder-embed-dim", DIM, "--decoder-embed-dim", DIM, "--encoder-ffn-embed-dim", FFN_DIM,
              "--decoder-ffn-embed-dim", FFN_DIM, "--encoder-attention-heads", HEADS,
              "--decoder-attention-heads", HEADS, "--dropout", 0)
LM_FLAGS = ("--decoder-layers", LM_LAYERS, "--decoder-embed-dim", DIM, "--decoder-input-dim", DIM,
            "--decoder-output-dim", DIM, "--decoder-ffn-embed-dim", FFN_DIM, "--decoder-attention-heads", HEADS,
            "--dropout", 0)
LN_OF = {"self_attn": "self_attn_layer_norm", "encoder_attn": "encoder_attn_layer_norm", "ffn": "final_layer_norm"}
LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj")
PRE_LN_FAMILY = ("pre-ln", "dlcl", "normformer", "sub-ln", "sandwich-ln")
LN_FREE = ("rezero", "t-fixup", "r-fixup")
GRAD_TOLERANCE = 1e-4  # largest gradient difference / largest gradient (float32 softmax in fairseq's decoder)


@pytest.fixture(scope="module")
def lm_data(tiny_data, tmp_path_factory):
    """A language_modeling data directory: only its dictionary is needed to build a model."""
    root = tmp_path_factory.mktemp("lm_dict")
    shutil.copy(tiny_data / "dict.src.txt", root / "dict.txt")
    return root


def make(data, scheme, *flags, lm=False):
    """A tiny model with ``--residual-scheme scheme``: 3L-2L encoder-decoder, or a 2L ``deepnet_lm``."""
    if lm:
        return build(data, "--residual-scheme", scheme, *LM_FLAGS, *flags, task_name="language_modeling",
                     arch="deepnet_lm")
    return build(data, "--residual-scheme", scheme, "--encoder-layers", N, "--decoder-layers", M, *SIZE_FLAGS, *flags)


def stacks(model):
    """[(side, stack)] of a model; an LM has only its decoder."""
    encoder = getattr(model, "encoder", None)
    return ([("encoder", encoder)] if encoder is not None else []) + [("decoder", model.decoder)]


def run_model(model, task, lm):
    """A function running the model on one fixed batch and returning its logits."""
    if lm:
        tokens = torch.randint(4, len(task.dictionary), (3, 7), generator=torch.Generator().manual_seed(0))
        return lambda: model(tokens)[0]
    src, lengths, prev = sample_batch(task)  # no padding: every token >= 4
    return lambda: model(src, lengths, prev)[0]


# ----------------------------------------------------------------------------------------------------------
# the formulas, written out with plain tensor operations


def ln(module: nn.Module, x: Tensor) -> Tensor:
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def lin(module: nn.Linear, x: Tensor) -> Tensor:
    return F.linear(x, module.weight, module.bias)


def heads(attn: nn.Module, query: Tensor, memory: Tensor, causal: bool) -> Tensor:
    """softmax(q k^T / sqrt(d_head) (+ causal mask)) v per head, shape (T, B, heads, d_head)."""
    t, b, e = query.shape
    h = attn.num_heads
    d = e // h
    q = lin(attn.q_proj, query).view(t, b, h, d) * d**-0.5
    k = lin(attn.k_proj, memory).view(-1, b, h, d)
    v = lin(attn.v_proj, memory).view(-1, b, h, d)
    scores = torch.einsum("tbhd,sbhd->bhts", q, k)
    if causal:
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,sbhd->tbhd", scores.softmax(-1), v)


@dataclass
class Where:
    """Where a sub-layer runs: the side, the model's depths, the encoder output (cross-attention)."""

    side: str
    n: int  # encoder layers (0 in an LM)
    m: int
    enc: Optional[Tensor]

    @property
    def causal(self) -> bool:
        return self.side == "decoder"


def branch(layer, sub: str, h: Tensor, where: Where) -> Tensor:
    """G(h): attention (self: q = k = v = h; cross: q = h, k = v = encoder output) or the ReLU FFN."""
    if sub == "ffn":
        return lin(layer.fc2, F.relu(lin(layer.fc1, h)))
    attn = getattr(layer, sub)
    memory = h if sub == "self_attn" else where.enc
    return lin(attn.out_proj, heads(attn, h, memory, where.causal and sub == "self_attn").flatten(2))


def norm(layer, sub):
    return getattr(layer, LN_OF[sub])


def post_ln(skip: Callable) -> Callable:
    """``LN(x * w + G(x))``, ``w = skip(layer, sub, where)``."""
    return lambda layer, sub, x, where: ln(norm(layer, sub), x * skip(layer, sub, where) + branch(layer, sub, x, where))


def pre_ln(layer, sub, x, where):
    """``x + G(LN(x))``."""
    return x + branch(layer, sub, ln(norm(layer, sub), x), where)


def closed_omega(layer, sub, where):
    """admin-torch: ``sqrt((n + 1) / ln(n + 1) - 1)``, n = 2N (encoder), 3M (decoder), 2M (decoder-only)."""
    n = 2 * where.n if where.side == "encoder" else (3 if where.n else 2) * where.m
    return math.sqrt((n + 1) / math.log(n + 1) - 1)


def rezero(layer, sub, x, where):
    """``x + a G(x)``, one a per layer."""
    return x + layer.rezero_weight * branch(layer, sub, x, where)


def t_fixup(layer, sub, x, where):
    """``x + G(x)``."""
    return x + branch(layer, sub, x, where)


def r_fixup(layer, sub, x, where):
    """FFN ``x + s fc2(b3 + relu(b2 + fc1(b1 + x)))``; attention ``x + s (b_out + Attn(x + b_in))``, where
    cross-attention shifts only its query."""
    s = getattr(layer, f"rfixup_{sub}_scale")
    if sub == "ffn":
        b1, b2, b3 = layer.rfixup_ffn_bias1, layer.rfixup_ffn_bias2, layer.rfixup_ffn_bias3
        return x + s * lin(layer.fc2, b3 + F.relu(b2 + lin(layer.fc1, b1 + x)))
    b_in, b_out = getattr(layer, f"rfixup_{sub}_bias_in"), getattr(layer, f"rfixup_{sub}_bias_out")
    attn = getattr(layer, sub)
    memory = x + b_in if sub == "self_attn" else where.enc
    attended = heads(attn, x + b_in, memory, where.causal and sub == "self_attn")
    return x + s * (b_out + lin(attn.out_proj, attended.flatten(2)))


def normformer(position: str, scale_resids: bool) -> Callable:
    """Self-attention ``x + LN_a(W_o HeadScale(heads))`` (paper) or ``x + LN_a(HeadScale(W_o heads))``
    (fairseq); cross-attention plain Pre-LN; FFN ``lambda x + fc2(LN_f(relu(fc1(LN x))))``."""

    def sublayer(layer, sub, x, where):
        h = ln(norm(layer, sub), x)
        if sub == "self_attn":
            attn, scale = layer.self_attn, layer.normformer_head_scale.weight[:, None]
            per_head = heads(attn, h, h, where.causal)
            if position == "paper":
                out = lin(attn.out_proj, (per_head * scale).flatten(2))
            else:
                out = (lin(attn.out_proj, per_head.flatten(2)).view_as(per_head) * scale).flatten(2)
            return x + ln(layer.normformer_attn_ln, out)
        if sub == "encoder_attn":
            return x + branch(layer, sub, h, where)
        skip = layer.normformer_resid_scale * x if scale_resids else x
        return skip + lin(layer.fc2, ln(layer.normformer_ffn_ln, F.relu(lin(layer.fc1, h))))

    return sublayer


def sub_ln(layer, sub, x, where):
    """Self-attention ``x + W_o LN(Attn(LN x))``, FFN ``x + fc2(LN(relu(fc1(LN x))))``, cross-attention plain."""
    h = ln(norm(layer, sub), x)
    if sub == "self_attn":
        attn = layer.self_attn
        return x + lin(attn.out_proj, ln(layer.sub_ln_attn, heads(attn, h, h, where.causal).flatten(2)))
    if sub == "encoder_attn":
        return x + branch(layer, sub, h, where)
    return x + lin(layer.fc2, ln(layer.sub_ln_ffn, F.relu(lin(layer.fc1, h))))


def sandwich_ln(layer, sub, x, where):
    """``x + LN_out(G(LN_in x))`` on every sub-layer."""
    return x + ln(getattr(layer, f"sandwich_{sub}_out_ln"), branch(layer, sub, ln(norm(layer, sub), x), where))


def unit(layer, sub, where):
    return 1.0


def admin_vector(layer, sub, where):
    return getattr(layer, f"admin_omega_{sub}")


# (test id, scheme, flags, decoder-only, sub-layer formula)
FORMULAS = [
    ("post-ln", "post-ln", (), False, post_ln(unit)),
    ("post-ln-lm", "post-ln", (), True, post_ln(unit)),
    ("pre-ln", "pre-ln", (), False, pre_ln),
    ("post-ln-init", "post-ln-init", (), False, post_ln(unit)),
    ("ds-init", "ds-init", (), False, post_ln(unit)),
    ("admin", "admin", (), False, post_ln(admin_vector)),
    ("admin-closed", "admin-closed", (), False, post_ln(closed_omega)),
    ("admin-closed-lm", "admin-closed", (), True, post_ln(closed_omega)),
    ("admin-closed-trainable", "admin-closed", ("--admin-omega-trainable",), False, post_ln(admin_vector)),
    ("rezero", "rezero", (), False, rezero),
    ("rezero-lm", "rezero", (), True, rezero),
    ("t-fixup", "t-fixup", (), False, t_fixup),
    ("r-fixup", "r-fixup", (), False, r_fixup),
    ("r-fixup-lm", "r-fixup", (), True, r_fixup),
    ("dlcl", "dlcl", (), False, pre_ln),
    ("dlcl-window-2", "dlcl", ("--dlcl-history-window", 2), False, pre_ln),
    ("normformer", "normformer", (), False, normformer("paper", False)),
    ("normformer-lm", "normformer", (), True, normformer("paper", False)),
    ("normformer-fairseq", "normformer", ("--normformer-head-scale-position", "fairseq"), False,
     normformer("fairseq", False)),
    ("normformer-scale-resids", "normformer", ("--normformer-scale-resids",), False, normformer("paper", True)),
    ("normformer-fairseq-scale-resids", "normformer",
     ("--normformer-head-scale-position", "fairseq", "--normformer-scale-resids"), False, normformer("fairseq", True)),
    ("sub-ln", "sub-ln", (), False, sub_ln),
    ("sub-ln-lm", "sub-ln", (), True, sub_ln),
    ("sandwich-ln", "sandwich-ln", (), False, sandwich_ln),
]


def randomize_(model: nn.Module, seed: int = 1) -> None:
    """Give every trainable parameter distinct random values: matrices ~ N(0, 1/fan_in), biases and shifts
    ~ N(0, 0.1), every other vector/scalar (LayerNorm gains, residual weights and scales, head scales,
    DLCL weights) ~ U(0.5, 1.5).  Frozen parameters keep their values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.dim() == 2 and not name.endswith("dlcl_weights"):
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
            elif "bias" in name.rsplit(".", 1)[-1]:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


def _keep_inputs(record, module, args, kwargs):
    record["args"], record["kwargs"] = args, kwargs


def _keep_output(record, module, args, output):
    record["out"] = output[0] if isinstance(output, tuple) else output


def capture_layers(layers, forward):
    """Each layer's inputs as it received them (after any stack hook) and its output."""
    records, handles = [{} for _ in layers], []
    for layer, record in zip(layers, records, strict=True):
        handles.append(layer.register_forward_pre_hook(partial(_keep_inputs, record), with_kwargs=True))
        handles.append(layer.register_forward_hook(partial(_keep_output, record)))
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return records


def check_layer(layer, record, formula, where: Where) -> None:
    """The layer's output and its gradients (input, encoder output, every trainable parameter) equal those
    of the formula applied sub-layer by sub-layer."""
    args = list(record["args"])
    leaves = [args[0].detach().clone().requires_grad_()]
    args[0] = leaves[0]
    if where.side == "decoder" and where.n:
        leaves.append(args[1].detach().clone().requires_grad_())
        args[1] = leaves[1]
        assert args[2] is None or not args[2].any()  # no padding, so the recomputation needs no mask
    where = Where(where.side, where.n, where.m, leaves[1] if len(leaves) > 1 else None)
    actual = layer.forward(*args, **record["kwargs"])  # the layer's own stack hooks (DLCL) are not re-run
    actual = actual[0] if isinstance(actual, tuple) else actual
    torch.testing.assert_close(actual.detach(), record["out"])
    x = leaves[0]
    subs = ("self_attn", "encoder_attn", "ffn") if where.enc is not None else ("self_attn", "ffn")
    for sub in subs:
        x = formula(layer, sub, x, where)
    torch.testing.assert_close(actual, x, rtol=1e-5, atol=1e-6)  # (fairseq's decoder softmax runs in float32)
    named = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    inputs = leaves + [p for _, p in named]
    probe = torch.randn(actual.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad((actual * probe).sum(), inputs, allow_unused=True)
    want = torch.autograd.grad((x * probe).sum(), inputs, allow_unused=True)
    names = ["layer input", "encoder output"][: len(leaves)] + [n for n, _ in named]
    for name, g, w, p in zip(names, got, want, inputs, strict=True):
        if name.endswith("k_proj.bias"):  # softmax ignores a key bias (q.b_k is the same for every key): d/db = 0
            continue
        g = torch.zeros_like(p) if g is None else g
        w = torch.zeros_like(p) if w is None else w
        assert g.abs().max() > 1e-6, f"{where.side}: no gradient reaches {name}"
        error = (g - w).abs().max().item() / w.abs().max().item()
        assert error < GRAD_TOLERANCE, f"{where.side}: d/d {name} differs from the formula's by {error:.2e} (relative)"


@pytest.mark.parametrize("scheme,flags,lm,formula", [f[1:] for f in FORMULAS], ids=[f[0] for f in FORMULAS])
def test_every_sublayer_computes_the_scheme_formula_with_its_gradients(tiny_data, lm_data, scheme, flags, lm, formula):
    model, task = make(lm_data if lm else tiny_data, scheme, *flags, lm=lm)
    randomize_(model)
    model.double()  # float64: the recomputation must agree to rounding, its gradients too
    forward = run_model(model, task, lm)
    n, m = (0, LM_LAYERS) if lm else (N, M)
    checked = 0
    for side, stack in stacks(model):
        records = capture_layers(stack.layers, forward)
        for layer, record in zip(stack.layers, records, strict=True):
            check_layer(layer, record, formula, Where(side, n, m, None))
            checked += 1
        check_stack_output(stack, side, scheme, forward, records[-1]["out"])
    assert checked == (LM_LAYERS if lm else N + M)


def check_stack_output(stack, side, scheme, forward, last_layer_out):
    """Pre-LN family: the stack ends with its final LayerNorm (applied to the last layer's output, or to
    DLCL's last combination); Post-LN and LN-free schemes: no final LayerNorm."""
    final = stack.layer_norm
    if scheme not in PRE_LN_FAMILY:
        assert final is None, f"{scheme} {side} has a final LayerNorm"
        return
    assert isinstance(final, nn.LayerNorm), f"{scheme} {side} lacks its final LayerNorm"
    with capture({"final": final}) as seen, torch.no_grad():
        forward()
    torch.testing.assert_close(seen.outputs["final"], ln(final, seen.inputs["final"]))
    if scheme != "dlcl":
        torch.testing.assert_close(seen.inputs["final"], last_layer_out)


# ----------------------------------------------------------------------------------------------------------
# DLCL: the layer-input combinations, per-entry LayerNorms, window and their gradients


def capture_dlcl(stack, forward):
    """y_0 (the embedding output, before DLCL's hook), each layer's input (after the combination) and output
    y_l, and the final LayerNorm's input."""
    layers = {str(i): layer for i, layer in enumerate(stack.layers)}
    with capture({"y0": stack.layers[0]}, outputs=False, prepend=True) as embedded, capture(layers) as seen, \
            capture({"final": stack.layer_norm}, outputs=False) as final, torch.no_grad():
        forward()
    return {"in": [seen.inputs[i] for i in layers], "y": [embedded.inputs["y0"], *(seen.outputs[i] for i in layers)],
            "final": [final.inputs["final"]]}


@pytest.mark.parametrize("window", [-1, 1, 2])
def test_dlcl_layer_inputs_combine_normalized_history_within_the_window(tiny_data, window):
    model, task = make(tiny_data, "dlcl", "--dlcl-history-window", window)
    randomize_(model)
    model.double()
    forward = run_model(model, task, lm=False)
    for side, stack in stacks(model):
        layers = list(stack.layers)
        size = len(layers) + 1
        seen = capture_dlcl(stack, forward)
        weights = stack.dlcl_weights.detach()
        assert weights.shape == (size, size) and len(stack.dlcl_layer_norms) == size
        entries = [ln(stack.dlcl_layer_norms[k], seen["y"][k]) for k in range(size)]  # LN_k(y_k), each its own LN
        used = torch.zeros(size, size, dtype=torch.bool)
        for row in range(size):
            first = 0 if window == -1 else max(0, row + 1 - window)
            used[row, first: row + 1] = True
            expected = sum(weights[row, k] * entries[k] for k in range(first, row + 1))
            actual = seen["in"][row] if row < len(layers) else seen["final"][0]
            torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9, msg=f"{side} row {row}")
        model.zero_grad()
        forward().pow(2).mean().backward()
        grad = stack.dlcl_weights.grad
        assert torch.count_nonzero(grad[~used]) == 0, f"{side}: weights outside the window get gradient"
        assert torch.count_nonzero(grad[used]) == used.sum(), f"{side}: a weight inside the window gets no gradient"
        for k, norm_k in enumerate(stack.dlcl_layer_norms):
            if used[:, k].any():
                assert norm_k.weight.grad.abs().max() > 0, f"{side}: LN_{k} gets no gradient"


def test_dlcl_init_is_the_lower_triangular_average(tiny_data):
    model, _ = make(tiny_data, "dlcl")
    for side, stack in stacks(model):
        size = len(stack.layers) + 1
        expected = torch.tensor([[1 / (row + 1) if k <= row else 0.0 for k in range(size)] for row in range(size)])
        torch.testing.assert_close(stack.dlcl_weights.detach(), expected, msg=side)


# ----------------------------------------------------------------------------------------------------------
# Admin: the profiled ratios, on every sub-layer of every stack (encoder-decoder and decoder-only)


@pytest.mark.parametrize("lm", [False, True], ids=["enc-dec", "lm"])
def test_admin_profiled_omegas_accumulate_branch_variances(tiny_data, lm_data, lm):
    """Per stack: w_1 = 1, then w_{i+1} = sqrt(Var[x_i w_i] + Var[G_i(x_i)]) over the sub-layers in order."""
    model, task = make(lm_data if lm else tiny_data, "admin", lm=lm)
    forward = run_model(model, task, lm)
    model.train()  # the first training forward profiles (dropout is 0: the same maths as eval)
    forward()
    model.eval()
    for side, stack in stacks(model):
        cross = side == "decoder" and not lm
        subs = ("self_attn", "encoder_attn", "ffn") if cross else ("self_attn", "ffn")
        assert all(float(layer.admin_profiled) == 1.0 for layer in stack.layers)
        with torch.no_grad():
            io = residual_io(stack.layers, forward, cross)  # per layer, per sub-layer: (x, G(x), LN input)
        ratio = 1.0
        for layer, sublayers in zip(stack.layers, io, strict=True):
            for sub, (x, g, _) in zip(subs, sublayers, strict=True):
                omega = getattr(layer, f"admin_omega_{sub}").detach()
                torch.testing.assert_close(omega, torch.full_like(omega, ratio), rtol=1e-4, atol=1e-6,
                                           msg=f"{side} {sub}")
                ratio = math.sqrt((x * omega).var(unbiased=False).item() + g.var(unbiased=False).item())
    profiled = {name: p.detach().clone() for name, p in model.named_parameters() if "admin_omega" in name}
    model.train()
    forward()  # a later training forward does not profile again
    assert all(torch.equal(p, profiled[name]) for name, p in model.named_parameters() if name in profiled)


# ----------------------------------------------------------------------------------------------------------
# initialisation


def xavier_bound(module: nn.Linear) -> float:
    fan_out, fan_in = module.weight.shape
    return math.sqrt(6.0 / (fan_in + fan_out))


def default_bound(module: nn.Linear) -> float:
    """PyTorch's nn.Linear default (kaiming-uniform, a = sqrt 5) bound for weights and biases: 1/sqrt(fan_in)."""
    return 1 / math.sqrt(module.weight.shape[1])


def ks_limit(n: int) -> float:
    """Kolmogorov-Smirnov distance exceeded by chance with probability about 1e-5."""
    return 2.5 / math.sqrt(n)


def assert_uniform(w: Tensor, bound: float, what: str) -> None:
    """w ~ U(-bound, bound): within the bound, filling it, and uniform by Kolmogorov-Smirnov."""
    w = w.detach().flatten().double()
    top = w.abs().max().item()
    assert 0.97 * bound < top <= bound * (1 + 1e-6), f"{what}: max |w| {top:.5g}, expected U(+-{bound:.5g})"
    distance = stats.kstest(w.numpy(), "uniform", args=(-bound, 2 * bound)).statistic
    assert distance < ks_limit(w.numel()), f"{what}: KS distance {distance:.4f} from U(+-{bound:.5g})"


def assert_normal(w: Tensor, std: float, what: str) -> None:
    """w ~ N(0, std): its standard deviation within 10% and normal by Kolmogorov-Smirnov."""
    w = w.detach().flatten().double()
    assert w.std().item() == pytest.approx(std, rel=0.1), f"{what}: std {w.std().item():.5g}, expected {std:.5g}"
    distance = stats.kstest(w.numpy(), "norm", args=(0, std)).statistic
    assert distance < ks_limit(w.numel()), f"{what}: KS distance {distance:.4f} from N(0, {std:.5g})"


def fairseq_init(name: str, module: nn.Linear):
    """fairseq 0.12: q/k/v Xavier-uniform gain 1/sqrt(2), out_proj Xavier-uniform, fc1/fc2 nn.Linear default."""
    if name in ("fc1", "fc2"):
        return "uniform", default_bound(module)
    if name.endswith("out_proj"):
        return "uniform", xavier_bound(module)
    return "uniform", xavier_bound(module) / math.sqrt(2)


def era_init(name: str, module: nn.Linear):
    """fairseq 0.6-0.9 (the peer methods' code): fairseq's attention, Xavier-uniform fc1/fc2."""
    if name in ("fc1", "fc2"):
        return "uniform", xavier_bound(module)
    return fairseq_init(name, module)


def scaled(dist, factor):
    return dist[0], dist[1] * factor


@dataclass
class At:
    """One linear of one layer: ``name`` as in fairseq (``fc1``, ``encoder_attn.v_proj``), layer l (from 1)."""

    side: str
    layer: int
    name: str
    n: int
    m: int

    @property
    def depth(self) -> int:
        return self.n if self.side == "encoder" else self.m

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def post_ln_init_expected(scope):
    def expected(at: At, module):
        dist = era_init(at.name, module)
        if scope == "all" or at.name == "fc2":
            dist = scaled(dist, 1 / (at.depth - at.layer + 1))
        return dist

    return expected


def ds_init_expected(alpha, exponent):
    return lambda at, module: ("uniform", xavier_bound(module) * alpha / at.layer**exponent)


def t_fixup_expected(at: At, module):
    scale = 0.67 * at.n**-0.25 if at.side == "encoder" else (9 * at.m) ** -0.25
    if at.kind in ("q_proj", "k_proj"):
        return fairseq_init(at.name, module)
    return "uniform", xavier_bound(module) * scale  # v: fairseq's 1/sqrt(2) undone by T-Fixup's sqrt(2)


def r_fixup_expected(at: At, module):
    branches = 2 * at.n + 3 * at.m if at.n else 2 * at.m
    if at.kind == "fc1":
        return "uniform", xavier_bound(module) * branches**-0.5
    if at.kind in ("q_proj", "k_proj", "v_proj"):
        return "uniform", xavier_bound(module) * branches ** (-1 / 6)
    return "zero", 0.0


def sub_ln_gamma(side, n, m):
    if n and m:
        return math.sqrt(math.log(3 * m) * math.log(2 * n) / 3) if side == "encoder" else math.sqrt(math.log(3 * m))
    return math.sqrt(math.log(2 * (n or m)))


def sub_ln_expected(at: At, module):
    dist = era_init(at.name, module)
    if at.name in ("fc1", "fc2", "self_attn.v_proj", "self_attn.out_proj"):
        return scaled(dist, sub_ln_gamma(at.side, at.n, at.m))
    return dist  # q/k and the whole cross-attention keep their init


def sandwich_expected(at: At, module):
    if at.kind in ("out_proj", "fc2"):
        return "normal", 0.02 / math.sqrt(2 * at.depth)
    return "normal", 0.02


def fairseq_expected(at, module):
    return fairseq_init(at.name, module)


def era_expected(at, module):
    return era_init(at.name, module)


# biases: "fairseq" (q/k/v/fc: nn.Linear default, out_proj: 0), "era" (fc and out_proj 0, q/k/v default), "zero"
INITS = [
    ("post-ln", "post-ln", (), False, fairseq_expected, "fairseq"),
    ("pre-ln", "pre-ln", (), False, fairseq_expected, "fairseq"),
    ("post-ln-init", "post-ln-init", (), False, post_ln_init_expected("all"), "era"),
    ("post-ln-init-ffn-out", "post-ln-init", ("--post-ln-init-scope", "ffn-out"), False,
     post_ln_init_expected("ffn-out"), "era"),
    ("ds-init", "ds-init", (), False, ds_init_expected(1.0, 0.5), "zero"),
    ("ds-init-a0.8-e0.25", "ds-init", ("--ds-init-alpha", 0.8, "--ds-init-exponent", 0.25), False,
     ds_init_expected(0.8, 0.25), "zero"),
    ("admin", "admin", (), False, era_expected, "era"),
    ("admin-closed", "admin-closed", (), False, era_expected, "era"),
    ("rezero", "rezero", (), False, era_expected, "era"),
    ("t-fixup", "t-fixup", (), False, t_fixup_expected, "era"),
    ("t-fixup-lm", "t-fixup", (), True, t_fixup_expected, "era"),
    ("r-fixup", "r-fixup", (), False, r_fixup_expected, "zero"),
    ("r-fixup-lm", "r-fixup", (), True, r_fixup_expected, "zero"),
    ("dlcl", "dlcl", (), False, fairseq_expected, "fairseq"),
    ("normformer", "normformer", (), False, fairseq_expected, "fairseq"),
    ("sub-ln", "sub-ln", (), False, sub_ln_expected, "era"),
    ("sub-ln-lm", "sub-ln", (), True, sub_ln_expected, "era"),
    ("sandwich-ln", "sandwich-ln", (), False, sandwich_expected, "zero"),
]


def layer_linears(layer):
    names = ["fc1", "fc2"] + [f"{attn}.{proj}" for attn in ("self_attn", "encoder_attn")
                              if getattr(layer, attn, None) is not None for proj in LINEARS]
    return [(name, layer.get_submodule(name)) for name in names]


def check_bias(bias: Tensor, module, name, rule, what):
    if rule == "zero" or name.endswith("out_proj") or (rule == "era" and name in ("fc1", "fc2")):
        assert torch.count_nonzero(bias) == 0, f"{what}: bias not zero"
    else:  # nn.Linear's default U(+-1/sqrt(fan_in))
        assert 0 < bias.abs().max().item() <= default_bound(module) * (1 + 1e-6), f"{what}: not the default bias"


@pytest.mark.parametrize("scheme,flags,lm,expected,biases", [i[1:] for i in INITS], ids=[i[0] for i in INITS])
def test_every_linear_starts_from_the_scheme_init(tiny_data, lm_data, scheme, flags, lm, expected, biases):
    model, _ = make(lm_data if lm else tiny_data, scheme, *flags, lm=lm)
    n, m = (0, LM_LAYERS) if lm else (N, M)
    normal_pool = []
    for side, stack in stacks(model):
        for index, layer in enumerate(stack.layers, start=1):
            for name, module in layer_linears(layer):
                at = At(side, index, name, n, m)
                what = f"{scheme} {side} layer {index} {name}"
                family, scale = expected(at, module)
                if family == "uniform":
                    assert_uniform(module.weight, scale, what)
                elif family == "normal":
                    assert_normal(module.weight, scale, what)
                    normal_pool.append(module.weight.detach().flatten() / scale)
                else:
                    assert torch.count_nonzero(module.weight) == 0, f"{what}: not zero"
                check_bias(module.bias, module, name, biases, what)
                frozen = scheme == "r-fixup"
                assert module.bias.requires_grad is not frozen, f"{what}: bias frozen={not frozen}"
    if normal_pool:  # the shape of the distribution, on all weights pooled (one matrix is too small a sample)
        pooled = torch.cat(normal_pool).double().numpy()
        assert stats.kstest(pooled, "norm").statistic < ks_limit(len(pooled))


def test_deepnorm_paper_init_is_xavier_normal(tiny_data):
    """DeepNorm's init is Xavier *normal* (gain beta on fc1/fc2/v/out, 1 on q/k): each side's weights, each
    divided by its expected standard deviation and pooled, are N(0, 1) by Kolmogorov-Smirnov (a uniform init
    with the same variance is at distance ~0.06, over 3x the limit of 0.016 for these 24576 samples)."""
    model, _ = build(tiny_data, "--deepnorm", "--encoder-layers", N, "--decoder-layers", M, *SIZE_FLAGS)
    constants = paper_constants(N, M)
    for side, stack in stacks(model):
        beta = constants[side][1]
        pooled = []
        for layer in stack.layers:
            for name, module in layer_linears(layer):
                gain = 1.0 if name.endswith(("q_proj", "k_proj")) else beta
                pooled.append(module.weight.detach().flatten() / xavier_std(module, gain))
        z = torch.cat(pooled).double().numpy()
        assert z.size == 24576
        distance = stats.kstest(z, "norm").statistic
        assert distance < ks_limit(z.size), f"{side}: KS distance {distance:.4f} from N(0, 1)"


# extra parameters' initial values (name -> value), on every layer where the scheme puts them
def _admin_closed_init(side, n, m):
    count = 2 * n if side == "encoder" else 3 * m
    return math.sqrt((count + 1) / math.log(count + 1) - 1)


EXTRA_INITS = [
    ("admin", (), lambda side, subs: {f"admin_omega_{s}": 1.0 for s in subs}),
    ("admin-closed", ("--admin-omega-trainable",),
     lambda side, subs: {f"admin_omega_{s}": _admin_closed_init(side, N, M) for s in subs}),
    ("rezero", (), lambda side, subs: {"rezero_weight": 0.0}),
    ("r-fixup", (), lambda side, subs: {
        **{f"rfixup_{s}_scale": 1.0 for s in subs},
        **{f"rfixup_{s}_bias_{d}": 0.0 for s in subs if s != "ffn" for d in ("in", "out")},
        **{f"rfixup_ffn_bias{i}": 0.0 for i in (1, 2, 3)}}),
    ("normformer", ("--normformer-scale-resids",), lambda side, subs: {
        "normformer_head_scale.weight": 1.0, "normformer_resid_scale": 1.0}),
]


@pytest.mark.parametrize("scheme,flags,values", EXTRA_INITS, ids=[e[0] for e in EXTRA_INITS])
def test_extra_parameters_start_at_their_documented_values(tiny_data, scheme, flags, values):
    model, _ = make(tiny_data, scheme, *flags)
    for side, stack in stacks(model):
        subs = ("self_attn", "encoder_attn", "ffn") if side == "decoder" else ("self_attn", "ffn")
        for index, layer in enumerate(stack.layers, start=1):
            for name, value in values(side, subs).items():
                p = layer.get_parameter(name)
                assert p.requires_grad, f"{scheme} {side} layer {index} {name} is not trainable"
                torch.testing.assert_close(p.detach(), torch.full_like(p, value), msg=f"{side} {index} {name}")


def test_embeddings_are_scaled_only_by_t_fixup(tiny_data):
    """T-Fixup: encoder table x (9N)^(-1/4), decoder x (9M)^(-1/4); a table shared with the encoder is scaled
    once.  Every other scheme keeps fairseq's table.  The embeddings are built before any layer, from the same
    seed, so they are compared exactly with the stock Post-LN model's."""
    for shared in ((), ("--share-all-embeddings",)):
        reference, _ = make(tiny_data, "post-ln", *shared)
        enc, dec = reference.encoder.embed_tokens.weight.detach(), reference.decoder.embed_tokens.weight.detach()
        for scheme in ("t-fixup", "pre-ln", "rezero", "r-fixup", "sandwich-ln"):
            model, _ = make(tiny_data, scheme, *shared)
            enc_scale, dec_scale = ((9 * N) ** -0.25, (9 * M) ** -0.25) if scheme == "t-fixup" else (1.0, 1.0)
            if shared:
                dec_scale = enc_scale
                assert model.encoder.embed_tokens.weight is model.decoder.embed_tokens.weight
            torch.testing.assert_close(model.encoder.embed_tokens.weight.detach(), enc * enc_scale, msg=scheme)
            torch.testing.assert_close(model.decoder.embed_tokens.weight.detach(), dec * dec_scale, msg=scheme)


def test_t_fixup_lm_embedding_scale(lm_data):
    reference, _ = make(lm_data, "post-ln", lm=True)
    model, _ = make(lm_data, "t-fixup", lm=True)
    torch.testing.assert_close(model.decoder.embed_tokens.weight.detach(),
                               reference.decoder.embed_tokens.weight.detach() * (9 * LM_LAYERS) ** -0.25)


@pytest.mark.parametrize("scheme", ["rezero", "r-fixup"])
def test_identity_start_still_passes_gradient_into_the_branch(tiny_data, scheme):
    """Schemes starting every layer as the identity must still train: at init the loss has a gradient for
    every decoder layer's ReZero a (G(x) != 0) and R-Fixup zero-initialised output projections (fc2, self- and
    cross-attention out_proj).  (The encoder gets none on this first step: every cross-attention branch
    starts at zero, so the loss does not depend on the encoder yet.)"""
    model, task = make(tiny_data, scheme)
    model.train()
    run_model(model, task, lm=False)().logsumexp(-1).mean().backward()
    names = ["rezero_weight"] if scheme == "rezero" else [
        "fc2.weight", "self_attn.out_proj.weight", "encoder_attn.out_proj.weight"]
    for index, layer in enumerate(model.decoder.layers, start=1):
        for name in names:
            grad = layer.get_parameter(name).grad
            assert grad is not None and grad.abs().max() > 0, f"decoder layer {index}: no gradient for {name}"


# ----------------------------------------------------------------------------------------------------------
# structure: the parameters each scheme adds or removes


def _extra_names(scheme, flags, index, subs):
    """Parameter names (relative to the stack) the scheme adds, with their shapes."""
    prefix = f"layers.{index}."
    extra = {}
    if scheme in ("admin",) or (scheme == "admin-closed" and flags):
        extra.update({f"{prefix}admin_omega_{s}": (DIM,) for s in subs})
    if scheme == "rezero":
        extra[f"{prefix}rezero_weight"] = (1,)
    if scheme == "r-fixup":
        extra.update({f"{prefix}rfixup_{s}_scale": (1,) for s in subs})
        extra.update({f"{prefix}rfixup_{s}_bias_{d}": (1,) for s in subs if s != "ffn" for d in ("in", "out")})
        extra.update({f"{prefix}rfixup_ffn_bias{i}": (1,) for i in (1, 2, 3)})
    if scheme == "normformer":
        extra[f"{prefix}normformer_head_scale.weight"] = (HEADS,)
        extra.update({f"{prefix}normformer_attn_ln.{p}": (DIM,) for p in ("weight", "bias")})
        extra.update({f"{prefix}normformer_ffn_ln.{p}": (FFN_DIM,) for p in ("weight", "bias")})
        if flags:
            extra[f"{prefix}normformer_resid_scale"] = (DIM,)
    if scheme == "sub-ln":
        extra.update({f"{prefix}sub_ln_attn.{p}": (DIM,) for p in ("weight", "bias")})
        extra.update({f"{prefix}sub_ln_ffn.{p}": (FFN_DIM,) for p in ("weight", "bias")})
    if scheme == "sandwich-ln":
        extra.update({f"{prefix}sandwich_{s}_out_ln.{p}": (DIM,) for s in subs for p in ("weight", "bias")})
    return extra


STRUCTURES = [("post-ln", ()), ("pre-ln", ()), ("post-ln-init", ()), ("ds-init", ()), ("admin", ()),
              ("admin-closed", ()), ("admin-closed", ("--admin-omega-trainable",)), ("rezero", ()), ("t-fixup", ()),
              ("r-fixup", ()), ("dlcl", ()), ("normformer", ()), ("normformer", ("--normformer-scale-resids",)),
              ("sub-ln", ()), ("sandwich-ln", ())]


@pytest.mark.parametrize("scheme,flags", STRUCTURES, ids=[s + ("+opt" if f else "") for s, f in STRUCTURES])
def test_scheme_adds_and_removes_exactly_its_parameters(tiny_data, scheme, flags):
    """Relative to stock Post-LN: the scheme's extra parameters (README's column) on every layer and side,
    the final LayerNorm of the Pre-LN family, DLCL's weights and L+1 LayerNorms, no LayerNorm at all in the
    LN-free schemes; nothing else changes."""
    base, _ = make(tiny_data, "post-ln")
    model, _ = make(tiny_data, scheme, *flags)
    for side, stack in stacks(model):
        before = {n: tuple(p.shape) for n, p in getattr(base, side).named_parameters()}
        after = {n: tuple(p.shape) for n, p in stack.named_parameters()}
        layers = N if side == "encoder" else M
        subs = ("self_attn", "encoder_attn", "ffn") if side == "decoder" else ("self_attn", "ffn")
        added = {}
        for index in range(layers):
            added.update(_extra_names(scheme, flags, index, subs))
        if scheme in PRE_LN_FAMILY:
            added.update({f"layer_norm.{p}": (DIM,) for p in ("weight", "bias")})
        if scheme == "dlcl":
            added["dlcl_weights"] = (layers + 1, layers + 1)
            added.update({f"dlcl_layer_norms.{k}.{p}": (DIM,) for k in range(layers + 1) for p in ("weight", "bias")})
        removed = set()
        if scheme in LN_FREE:
            removed = {n for n in before if any(f".{ln_name}." in n for ln_name in LN_OF.values())}
            assert not any(isinstance(mod, nn.LayerNorm) for mod in stack.modules()), f"{scheme} {side} has a LN"
        assert {n: s for n, s in after.items() if n not in before} == added, f"{scheme} {side}"
        assert set(before) - set(after) == removed, f"{scheme} {side}"
        assert all(before[n] == after[n] for n in before if n in after)


@pytest.mark.parametrize("flags,refused", [((), True), (("--allow-rezero-fp16",), False)])
def test_rezero_fp16_needs_allow_rezero_fp16(tiny_data, flags, refused):
    if refused:
        with pytest.raises(DeepNetConfigError, match="--allow-rezero-fp16"):
            make(tiny_data, "rezero", "--fp16", *flags)
    else:
        model, _ = make(tiny_data, "rezero", "--fp16", *flags)
        assert all(layer.rezero_weight.item() == 0 for layer in model.encoder.layers)
