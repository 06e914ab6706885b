"""``xent_triton.distillation_loss`` against float64 torch compositions (``log_softmax`` and
explicit sums), loss and student gradient, under the tolerance rule of tests/harness/tolerances.py (torch's
own error = the same composition with the student in its dtype and the fp32 teacher).

Tables: every divergence x T in {1, 2} x reduction x label setting, fp32 and bf16 students with
fp32 teachers at C in 1000..3000; spot cases at C = 50257 and 128256; layouts, padded -inf logits,
multi-block / split launches, the torch fallback (float64), torch.compile, bad input. Ids read
divergence-T-reduction-labels-dtype-C.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from tolerances import assert_close_rule
from xent_triton.core import launch

# the interpreter evaluates both branches of tl.where on numpy: -inf - -inf, 0 * inf in the
# discarded branch warn there (masked lanes, padded classes); the results are checked below
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
DT = {F32: "fp32", BF16: "bf16", F64: "fp64"}


def composed(s, t, labels, divergence="kl", beta=0.5, temperature=1.0, ignore_index=-100,
             reduction="mean", ce_weight=0.0):
    """The semantics with torch's ops on the full tensors (float64 inputs: the truth)."""
    lq = F.log_softmax(s / temperature, -1)
    lp = F.log_softmax(t.to(lq.dtype) / temperature, -1)
    p, q = lp.exp(), lq.exp()
    zero = torch.zeros((), dtype=lq.dtype)
    if divergence == "kl":
        d = torch.where(p > 0, p * (lp - lq), zero).sum(-1)
    elif divergence == "reverse_kl":
        d = torch.where(q > 0, q * (lq - lp), zero).sum(-1)
    else:
        lm = torch.log(beta * p + (1 - beta) * q)
        d = (beta * torch.where(p > 0, p * (lp - lm), zero).sum(-1)
             + (1 - beta) * torch.where(q > 0, q * (lq - lm), zero).sum(-1))
    loss = d
    valid = torch.ones(d.shape, dtype=torch.bool)
    if labels is not None:
        valid = labels != ignore_index
        if ce_weight:
            ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1), reduction="none",
                                 ignore_index=ignore_index).view(d.shape)
            loss = ce_weight * ce + (1 - ce_weight) * d
        loss = torch.where(valid, loss, zero)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()


def make_inputs(shape, dtype, t_dtype=F32, ignore_frac=0.25, scale=2.0, with_labels=True):
    s = (torch.randn(shape) * scale).to(dtype)
    t = (torch.randn(shape) * scale + 0.5 * s.float()).to(t_dtype)
    labels = None
    if with_labels:
        labels = torch.randint(0, shape[-1], shape[:-1])
        labels[torch.rand(shape[:-1]) < ignore_frac] = -100
    return s, t, labels


def check(s, t, labels, upstream=None, **kw):
    """Loss and student gradient vs float64; returns the loss."""
    x = s.detach().clone().requires_grad_(True)
    ours = xent_triton.distillation_loss(x, t, labels, **kw)
    g = torch.randn(ours.shape, dtype=torch.float64) if upstream is None else upstream
    (ours.double() * g).sum().backward()
    # truth in float64; torch's own error: the student in its dtype
    sd = s.detach().double().requires_grad_(True)
    ref = composed(sd, t.double(), labels, **kw)
    (ref * g).sum().backward()
    st = s.detach().clone().requires_grad_(True)
    theirs = composed(st, t, labels, **kw)
    (theirs.double() * g).sum().backward()
    assert ours.dtype == (F64 if s.dtype == F64 else F32)
    assert_close_rule("loss", ours, theirs, ref, s.dtype)
    assert x.grad.dtype == s.dtype
    assert_close_rule("grad", x.grad, st.grad, sd.grad, s.dtype)
    if labels is not None:
        assert torch.all(x.grad[labels == kw.get("ignore_index", -100)] == 0)
    return ours


LABELS = {"nolabels": (False, 0.0), "labels": (True, 0.0), "labels-ce0.4": (True, 0.4)}
GRID = [
    pytest.param(div, T, red, lab, dt, C, id=f"{div}-T{T:g}-{red}-{lab}-{DT[dt]}-C{C}")
    for div, C in (("kl", 1000), ("reverse_kl", 2048), ("jsd", 3001))
    for T in (1.0, 2.0) for red in ("none", "sum", "mean") for lab in LABELS for dt in (F32, BF16)
]


@pytest.mark.parametrize("divergence,temperature,reduction,lab,dtype,C", GRID)
def test_grid(divergence, temperature, reduction, lab, dtype, C):
    with_labels, ce_weight = LABELS[lab]
    s, t, labels = make_inputs((5, C), dtype, with_labels=with_labels)
    upstream = None if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    check(s, t, labels, upstream, divergence=divergence, temperature=temperature, reduction=reduction,
          ce_weight=ce_weight, beta=0.3 if divergence == "jsd" else 0.5)


SPOTS = [
    pytest.param("kl", 50257, BF16, dict(temperature=2.0, ce_weight=0.5), id="kl-C50257-bf16-T2-ce0.5"),
    pytest.param("jsd", 50257, F32, dict(beta=0.7), id="jsd-C50257-fp32-beta0.7"),
    pytest.param("reverse_kl", 128256, BF16, dict(temperature=1.0), id="reverse_kl-C128256-bf16"),
    pytest.param("jsd", 128256, BF16, dict(temperature=2.0, ce_weight=0.2), id="jsd-C128256-bf16-T2-ce0.2"),
]


@pytest.mark.parametrize("divergence,C,dtype,kw", SPOTS)
def test_large_vocabulary(divergence, C, dtype, kw):
    s, t, labels = make_inputs((4, C), dtype, ignore_frac=0.0)
    labels[1] = -100
    check(s, t, labels, divergence=divergence, reduction="none", **kw)


# --- layouts, launches, special values ---------------------------------------------------------
def test_three_dim_bf16_teacher_and_strided_student():
    s, t, labels = make_inputs((2, 3, 257), F32, t_dtype=BF16)
    wide = torch.randn(2, 3, 2 * 257)
    wide[..., ::2] = s
    check(wide[..., ::2], t, labels, divergence="jsd", reduction="none", temperature=1.5, ce_weight=0.3)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_multi_block_and_split_backward(divergence):
    s, t, labels = make_inputs((3, 1000), F32)
    with launch.overrides(block_c=128, backward_splits=3):
        check(s, t, labels, divergence=divergence, reduction="none", temperature=2.0, ce_weight=0.25)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_padded_minus_inf_logits(divergence):
    """Both models pad the same classes with -inf: 0 log 0 := 0, so loss and gradient equal those
    of the unpadded rows, and the padded classes get exactly zero gradient."""
    s, t, labels = make_inputs((4, 300), F32, ignore_frac=0.0)
    labels = labels % 250
    kw = dict(divergence=divergence, reduction="none", ce_weight=0.5, temperature=2.0)
    g = torch.randn(4, dtype=torch.float64)
    ref_x = s[:, :250].clone().requires_grad_(True)
    ref = xent_triton.distillation_loss(ref_x, t[:, :250], labels, **kw)
    (ref.double() * g).sum().backward()
    s[:, 250:] = float("-inf")
    t[:, 250:] = float("-inf")
    x = s.clone().requires_grad_(True)
    with launch.overrides(block_c=128):
        out = xent_triton.distillation_loss(x, t, labels, **kw)
    (out.double() * g).sum().backward()
    check(s[:, :250], t[:, :250], labels, g, **kw)  # the unpadded rows vs float64
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad[:, :250], ref_x.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(x.grad[:, 250:] == 0)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_fallback_float64(divergence):
    """float64 students always take the torch twins of the kernels."""
    s, t, labels = make_inputs((6, 500), F64, t_dtype=F64)
    check(s, t, labels, divergence=divergence, reduction="none", temperature=2.0, ce_weight=0.3)


def test_teacher_gets_no_gradient():
    s, t, _ = make_inputs((4, 100), F32, with_labels=False)
    t.requires_grad_(True)
    s.requires_grad_(True)
    xent_triton.distillation_loss(s, t).backward()
    assert t.grad is None and s.grad is not None


def test_identical_distributions_zero_loss():
    s = torch.randn(3, 700)
    for div in ("kl", "reverse_kl", "jsd"):
        out = xent_triton.distillation_loss(s, s.clone(), divergence=div, reduction="none")
        assert out.abs().max() < 1e-5


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_compile_fullgraph(divergence):
    s, t, labels = make_inputs((4, 64), F32)

    def f(x, tt, y):
        return xent_triton.distillation_loss(x, tt, y, divergence=divergence, temperature=2.0, ce_weight=0.3)

    x1 = s.clone().requires_grad_(True)
    x2 = s.clone().requires_grad_(True)
    eager = f(x1, t, labels)
    eager.backward()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x2, t, labels)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(x2.grad, x1.grad)


# --- bad input -----------------------------------------------------------------------------------
def _s():
    return torch.randn(4, 30)


ERRORS = [
    pytest.param(lambda: ((_s(), torch.randn(4, 31)), {}), ValueError, "shape", id="shape-mismatch"),
    pytest.param(lambda: ((_s(), _s(), torch.tensor([0, 1, 30, 2])), {}), IndexError, "out of bounds",
                 id="label-eq-C"),
    pytest.param(lambda: ((_s(), _s(), torch.tensor([0, -3, 1, 2])), {}), IndexError, "out of bounds",
                 id="label-negative"),
    pytest.param(lambda: ((_s(), _s(), torch.tensor([0, 1])), {}), ValueError, "shape", id="labels-shape"),
    pytest.param(lambda: ((_s(), _s()), dict(temperature=-1.0)), ValueError, "temperature", id="T-negative"),
    pytest.param(lambda: ((_s(), _s()), dict(temperature=0.0)), ValueError, "temperature", id="T-zero"),
    pytest.param(lambda: ((_s(), _s()), dict(temperature=math.inf)), ValueError, "temperature", id="T-inf"),
    pytest.param(lambda: ((_s(), _s()), dict(divergence="jsd", beta=0.0)), ValueError, "beta", id="beta0"),
    pytest.param(lambda: ((_s(), _s()), dict(divergence="jsd", beta=1.2)), ValueError, "beta", id="beta1.2"),
    pytest.param(lambda: ((_s(), _s()), dict(divergence="js")), ValueError, "divergence", id="divergence"),
    pytest.param(lambda: ((_s(), _s()), dict(reduction="avg")), ValueError, "reduction", id="reduction"),
    pytest.param(lambda: ((_s(), _s()), dict(ce_weight=0.5)), ValueError, "target", id="ce-without-labels"),
    pytest.param(lambda: ((_s(), _s(), torch.zeros(4, dtype=torch.long)), dict(ce_weight=1.5)), ValueError,
                 "ce_weight", id="ce-weight-range"),
    pytest.param(lambda: ((_s(), torch.zeros(4, 30, dtype=torch.long)), {}), TypeError, "teacher_input",
                 id="int-teacher"),
]


@pytest.mark.parametrize("make,exc,msg", ERRORS)
def test_errors(make, exc, msg):
    args, kwargs = make()
    with pytest.raises(exc, match=msg):
        xent_triton.distillation_loss(*args, **kwargs)


# --- linear form ---------------------------------------------------------------------------------
def linear_inputs(N, D, Dt, C, dtype, bias=True):
    hs = torch.randn(N, D).to(dtype)
    ws = (torch.randn(C, D) / D ** 0.5).to(dtype)
    bs = (torch.randn(C) * 0.1).to(dtype) if bias else None
    ht = torch.randn(N, Dt)
    wt = torch.randn(C, Dt) / Dt ** 0.5
    bt = torch.randn(C) * 0.1 if bias else None
    return hs, ws, bs, ht, wt, bt


def linear_run(fn, hs, ws, bs, ht, wt, bt, labels, g, **kw):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (hs, ws, bs)]
    out = fn(*leaves, ht, wt, bt, labels, **kw)
    (out.double() * g).sum().backward()
    return out, [t.grad if t is not None else None for t in leaves]


def composed_linear(hs, ws, bs, ht, wt, bt, labels, **kw):
    kw.pop("chunk_size", None)
    return composed(F.linear(hs, ws, bs), F.linear(ht, wt, bt), labels, **kw)


def ours_linear(hs, ws, bs, ht, wt, bt, labels, **kw):
    return xent_triton.linear_distillation_loss(hs, ws, ht, wt, labels, linear_bias=bs,
                                                teacher_linear_bias=bt, **kw)


LINEAR = [
    pytest.param("kl", F32, True, dict(reduction="none", chunk_size=7), id="kl-fp32-bias-none-chunk7"),
    pytest.param("reverse_kl", BF16, True, dict(reduction="mean", temperature=2.0, chunk_size=16),
                 id="reverse_kl-bf16-bias-mean-T2-chunk16"),
    pytest.param("jsd", F32, False, dict(reduction="sum", ce_weight=0.3, beta=0.4), id="jsd-fp32-sum-ce0.3"),
    pytest.param("kl", F64, True, dict(reduction="none", ce_weight=0.5, chunk_size=5),
                 id="kl-fp64-fallback-ce0.5-chunk5"),
]


@pytest.mark.parametrize("divergence,dtype,bias,kw", LINEAR)
def test_linear(divergence, dtype, bias, kw):
    N, D, Dt, C = 37, 48, 40, 1500
    hs, ws, bs, ht, wt, bt = linear_inputs(N, D, Dt, C, dtype, bias)
    if dtype == F64:  # a float64 student with a float64 teacher: the whole fallback path
        ht, wt, bt = ht.double(), wt.double(), None if bt is None else bt.double()
    labels = torch.randint(0, C, (N,))
    labels[::4] = -100
    g = torch.randn(N, dtype=F64) if kw["reduction"] == "none" else torch.tensor(0.6, dtype=F64)
    kw = dict(kw, divergence=divergence)
    ours, grads = linear_run(ours_linear, hs, ws, bs, ht, wt, bt, labels, g, **kw)
    dbl = [None if t is None else t.double() for t in (hs, ws, bs, ht, wt, bt)]
    ref, ref_grads = linear_run(composed_linear, *dbl, labels, g, **kw)
    theirs, their_grads = linear_run(composed_linear, hs, ws, bs, ht, wt, bt, labels, g, **kw)
    assert_close_rule("loss", ours, theirs, ref, dtype)
    for name, a, t_, r in zip(("d_hidden", "d_weight", "d_bias"), grads, their_grads, ref_grads):
        if r is not None:
            assert a.dtype == dtype
            assert_close_rule(name, a, t_, r, dtype)


def test_linear_peak_memory_has_no_n_by_c_term():
    """Peak extra memory of forward + backward: the chunk buffers, the gradients and O(N) only."""
    import gc

    from harness import traffic

    N, D, C, chunk = 96, 16, 1024, 4
    hs, ws, bs, ht, wt, bt = linear_inputs(N, D, D, C, F32)
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    labels = torch.randint(0, C, (N,))

    def step():
        xent_triton.linear_distillation_loss(hs, ws, ht, wt, labels, divergence="jsd", ce_weight=0.2,
                                             chunk_size=chunk).backward()
        hs.grad = ws.grad = None

    step()
    gc.collect()
    peak = traffic.peak_extra_bytes(step)
    budget = 4 * chunk * C * 4 + 3 * (C * D + N * D + C) * 4 + 256 * N
    print(f"\nlinear_distillation_loss peak extra {peak} B; budget {budget} B; N x C fp32 = {N * C * 4} B")
    assert peak <= budget < N * C * 4


def test_linear_compile_fullgraph():
    hs, ws, bs, ht, wt, bt = linear_inputs(6, 16, 12, 64, F32)
    labels = torch.randint(0, 64, (6,))

    def f(h, w, b):
        return xent_triton.linear_distillation_loss(h, w, ht, wt, labels, linear_bias=b,
                                                    teacher_linear_bias=bt, divergence="jsd", ce_weight=0.3,
                                                    chunk_size=4)

    e_leaves = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
    c_leaves = [t.clone().requires_grad_(True) for t in (hs, ws, bs)]
    eager = f(*e_leaves)
    eager.backward()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*c_leaves)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(c_leaves, e_leaves):
        torch.testing.assert_close(a.grad, b.grad)


# --- bytes moved (interpreter only) ---------------------------------------------------------------
BUDGET = {"kl": 5.0, "reverse_kl": 5.0, "jsd": 7.0}
PER_ROW = 192  # O(N): labels + range check, per-row loss / stats (36 B), upstream, reduction scalars
TW_ROW = 64  # O(N) more with token_weight: read it, loss * w (and its backward), the weighted denominator
# (row_sums: the valid flags and weighted denominators; 241 B/row with softcap + token_weight, bf16 kl)


@pytest.mark.parametrize("divergence", list(BUDGET))
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("with_labels, extra", [(False, False), (True, False), (True, True)],
                         ids=["nolabels", "labels-ce0.3", "labels-ce0.3-softcap-token_weight"])
def test_bytes_moved(monkeypatch, divergence, dtype, with_labels, extra):
    """Forward + backward, teacher and student of one dtype: <= 5x (kl, reverse_kl) / 7x (jsd) the
    student logits' bytes + PER_ROW bytes per token, with softcap and token_weight too (the cap is
    applied in registers; the weights are O(N))."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("traffic counts Triton kernels only under the CPU interpreter")
    from harness import traffic

    monkeypatch.setenv("XENT_POISON_OUTPUTS", "0")  # users' buffers start uninitialised
    N, C = 16, 4096
    s, t, labels = make_inputs((N, C), dtype, t_dtype=dtype, ignore_frac=0.0, with_labels=with_labels)
    s.requires_grad_(True)
    more = dict(softcap=5.0, token_weight=torch.rand(N) + 0.5) if extra else {}
    with traffic.count() as r:
        xent_triton.distillation_loss(s, t, labels, divergence=divergence, temperature=2.0,
                                      ce_weight=0.3 if with_labels else 0.0, **more).backward()
    logit_bytes = N * C * s.element_size()
    ratio = r["bytes"] / logit_bytes
    print(f"\n{divergence} {DT[dtype]}{' softcap+tw' if extra else ''}: {ratio:.4f}x student logits "
          f"({(r['bytes'] - BUDGET[divergence] * logit_bytes) / N:.0f} B/row over {BUDGET[divergence]}x)")
    assert r["bytes"] <= BUDGET[divergence] * logit_bytes + (PER_ROW + (TW_ROW if extra else 0)) * N
