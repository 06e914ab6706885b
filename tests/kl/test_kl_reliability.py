"""Issue 18, the KL family's reliability items (item 2, the shift invariance, is tests/kl/test_kl_shift.py):
6 autocast, 7 torch.compile(dynamic=True), 8 zero-size inputs, 9 ignore_index validation,
10 empty_batch, 11 returned tensors editable in place, 12 frozen head without (C, D) buffers.
Each on both CPU paths (``path``: the Triton kernels under the interpreter = CUDA, the torch twins)
where the item concerns both; references in float64, tolerances from tests/harness/tolerances.py.
"""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from tolerances import assert_close_rule

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "triton" else "0")
    return request.param


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# ------------------------------------------------------------------ item 11: in-place edits
def lp_ent_ref(z, tokens, T):
    lq = F.log_softmax(z / T, -1)
    return lq.gather(-1, tokens[..., None])[..., 0], -(lq.exp() * lq).sum(-1)


EDIT_CASES = {
    "token_logprobs": lambda tok: lambda x, w: xent_triton.token_logprobs(x @ w.t(), tok, temperature=0.7,
                                                                          return_entropy=True),
    "linear_token_logprobs": lambda tok: lambda x, w: xent_triton.linear_token_logprobs(
        x, w, tok, temperature=0.7, return_entropy=True, chunk_size=3),
}


@pytest.mark.parametrize("fn", list(EDIT_CASES))
def test_returned_tensors_editable_in_place(path, fn):
    """``lp[0] = 0`` and ``ent.mul_(2)`` on the returned tensors: no error, and the gradient of
    what is computed from the edited tensors equals the float64 one of the same edits."""
    N, D, C = 7, 12, 301
    x, w = torch.randn(N, D), torch.randn(C, D) / 3
    tok = torch.randint(0, C, (N,))
    g1, g2 = torch.randn(N, dtype=F64), torch.randn(N, dtype=F64)

    def run(f, *ins):
        ins = [leaf(t) for t in ins]
        lp, ent = f(*ins)
        lp[0] = 0
        ent.mul_(2)
        ((lp.double() * g1).sum() + (ent.double() * g2).sum()).backward()
        return lp, ent, [t.grad for t in ins]

    ours = run(EDIT_CASES[fn](tok), x, w)
    ref = run(lambda a, b: lp_ent_ref(a @ b.t(), tok, 0.7), x.double(), w.double())
    theirs = run(lambda a, b: lp_ent_ref(a @ b.t(), tok, 0.7), x, w)
    flat = [o[:2] + tuple(o[2]) for o in (ours, theirs, ref)]
    for name, a, t_, r in zip(("lp", "ent", "dx", "dw"), *flat):
        assert_close_rule(name, a, t_, r, F32)


# ------------------------------------------------------------------ item 12: frozen head
def peak_backward(fn, N, C, D, bias):
    from harness import traffic

    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(C, D)  # frozen head
    b = torch.randn(C) if bias else None
    tok = torch.randint(0, C, (N,))
    ht, wt = torch.randn(N, D), torch.randn(C, D)

    def step():
        if fn == "linear_token_logprobs":
            lp, ent = xent_triton.linear_token_logprobs(h, w, tok, linear_bias=b, return_entropy=True,
                                                        chunk_size=4)
            (lp.sum() + ent.sum()).backward()
        else:
            xent_triton.linear_distillation_loss(h, w, ht, wt, tok, linear_bias=b, chunk_size=4).backward()
        h.grad = None

    step()
    gc.collect()
    return traffic.peak_extra_bytes(step)


@pytest.mark.parametrize("fn", ["linear_token_logprobs", "linear_distillation_loss"])
def test_frozen_head_allocates_no_weight_sized_buffer(path, fn):
    """Peak extra bytes of forward + backward with the head frozen at (N, C) and (N, 2C): the
    growth is the (chunk, C) logit buffers and O(C), no C x D term (dW, db, their scratch)."""
    N, C, D, chunk = 8, 256, 512, 4
    p1 = peak_backward(fn, N, C, D, True)
    p2 = peak_backward(fn, N, 2 * C, D, True)
    # the (chunk, C) logit buffers and (torch path) the twins' (chunk, C) temporaries, O(C) vectors
    per_c = 16 * chunk * 4 + 64
    print(f"\n{fn} frozen head peak extra: (N, C) {p1} B, (N, 2C) {p2} B; C D fp32 = {C * D * 4} B")
    assert p2 - p1 <= per_c * C < C * D * 4
    assert p1 <= per_c * C + N * D * 4 + 256 * N < C * D * 4


# ------------------------------------------------------------------ item 10: empty_batch
def distill(s, t, labels, **kw):
    return xent_triton.distillation_loss(s, t, labels, divergence="jsd", ce_weight=0.3, **kw)


def linear_distill(s, t, labels, **kw):
    """The linear form with identity heads: the logits are s and t."""
    eye = torch.eye(s.shape[-1])
    return xent_triton.linear_distillation_loss(s, eye, t, eye, labels, divergence="jsd", ce_weight=0.3,
                                                chunk_size=2, **kw)


BOTH = pytest.mark.parametrize("fn", [distill, linear_distill],
                               ids=["distillation_loss", "linear_distillation_loss"])


@BOTH
def test_empty_batch(path, fn):
    """Every label ignored, reduction="mean": "zero" gives exactly 0 and zero gradients; the
    default "nan" keeps torch's NaN."""
    s, t = torch.randn(5, 6), torch.randn(5, 6)
    labels = torch.full((5,), -100)
    x = leaf(s)
    out = fn(x, t, labels, empty_batch="zero")
    out.backward()
    assert out.item() == 0.0 and torch.all(x.grad == 0)
    assert torch.isnan(fn(leaf(s), t, labels))
    with pytest.raises(ValueError, match="empty_batch"):
        fn(leaf(s), t, labels, empty_batch="skip")


# ------------------------------------------------------------------ item 9: ignore_index
@BOTH
@pytest.mark.parametrize("bad", [True, 1.0, "x"])
def test_ignore_index_validated(fn, bad):
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(TypeError, match="ignore_index"):
        fn(leaf(s), t, torch.tensor([1, 2, 1, 0]), ignore_index=bad)


@BOTH
def test_ignore_index_none_is_default(fn):
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    labels = torch.tensor([1, -100, 1, 0])
    torch.testing.assert_close(fn(s, t, labels, ignore_index=None), fn(s, t, labels), rtol=0, atol=0)


# ------------------------------------------------------------------ item 8: zero-size inputs
def test_hidden_size_zero_is_f_linear(path):
    """D = 0: the logits are the bias (or zeros), as F.linear; finite, both paths, gradients to
    the bias and (empty) weight/hidden."""
    N, C = 5, 9
    h, w, b = torch.randn(N, 0), torch.randn(C, 0), torch.randn(C)
    ht, wt, bt = torch.randn(N, 0), torch.randn(C, 0), torch.randn(C)
    tok = torch.randint(0, C, (N,))
    for bias in (b, None):
        lp = xent_triton.linear_token_logprobs(h, w, tok, linear_bias=bias)
        ref = xent_triton.token_logprobs(F.linear(h, w, bias), tok)
        torch.testing.assert_close(lp, ref)
    hs, ws, bs = leaf(h), leaf(w), leaf(b)
    out = xent_triton.linear_distillation_loss(hs, ws, ht, wt, tok, linear_bias=bs, teacher_linear_bias=bt,
                                               divergence="reverse_kl", ce_weight=0.5)
    out.backward()
    bs2 = leaf(b)
    ref = xent_triton.distillation_loss(F.linear(h, w, bs2), F.linear(ht, wt, bt), tok,
                                        divergence="reverse_kl", ce_weight=0.5)
    ref.backward()
    assert torch.isfinite(out) and hs.grad.shape == (N, 0) and ws.grad.shape == (C, 0)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(bs.grad, bs2.grad)


ZERO_CLASSES = {
    "distillation_loss": lambda: xent_triton.distillation_loss(torch.randn(3, 0), torch.randn(3, 0)),
    "token_logprobs": lambda: xent_triton.token_logprobs(torch.randn(3, 0), torch.zeros(3, dtype=torch.long)),
    "linear_distillation_loss": lambda: xent_triton.linear_distillation_loss(
        torch.randn(3, 4), torch.randn(0, 4), torch.randn(3, 4), torch.randn(0, 4)),
    "linear_token_logprobs": lambda: xent_triton.linear_token_logprobs(
        torch.randn(3, 4), torch.randn(0, 4), torch.zeros(3, dtype=torch.long)),
}


@pytest.mark.parametrize("fn", list(ZERO_CLASSES))
def test_zero_classes_raise(path, fn):
    with pytest.raises(ValueError, match=r"C = 0"):
        ZERO_CLASSES[fn]()


def test_zero_tokens(path):
    s = torch.randn(0, 7, requires_grad=True)
    assert xent_triton.distillation_loss(s, torch.randn(0, 7), reduction="sum").item() == 0.0
    assert xent_triton.token_logprobs(s, torch.zeros(0, dtype=torch.long)).shape == (0,)
    h, w = torch.randn(0, 4, requires_grad=True), torch.randn(7, 4, requires_grad=True)
    out = xent_triton.linear_distillation_loss(h, w, torch.randn(0, 4), torch.randn(7, 4), reduction="sum")
    out.backward()
    assert out.item() == 0.0 and torch.all(w.grad == 0)


# ------------------------------------------------------------------ item 6: autocast
def test_autocast_fp32_weights_bf16_activations(path):
    """Under torch.autocast, fp32 head weights with bf16 hidden states are cast as F.linear casts
    them: the result equals the call on the cast operands, the fp32 weight gets an fp32 gradient."""
    N, D, C = 6, 16, 130
    h = torch.randn(N, D).to(BF16)
    w = torch.randn(C, D) / 4
    tok = torch.randint(0, C, (N,))
    ht, wt = torch.randn(N, D).to(BF16), torch.randn(C, D) / 4
    calls = {
        "linear_token_logprobs": lambda a, b, _: xent_triton.linear_token_logprobs(a, b, tok,
                                                                                   temperature=1.5),
        "linear_distillation_loss": lambda a, b, wt_: xent_triton.linear_distillation_loss(
            a, b, ht, wt_, tok, reduction="none"),
    }
    for name, f in calls.items():
        hw, ww = leaf(h), leaf(w)
        with torch.autocast("cpu", dtype=BF16):
            out = f(hw, ww, wt)
        out.double().sum().backward()
        hc, wc = leaf(h), leaf(w.to(BF16))
        ref = f(hc, wc, wt.to(BF16))
        ref.double().sum().backward()
        assert ww.grad.dtype == F32, name
        torch.testing.assert_close(out, ref, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ww.grad, wc.grad.float(), rtol=0, atol=0, msg=name)
        torch.testing.assert_close(hw.grad, hc.grad, rtol=0, atol=0, msg=name)


def test_dtype_mismatch_names_the_arguments():
    """Outside autocast a mismatch raises, naming linear_token_logprobs' own arguments."""
    with pytest.raises(ValueError, match=r"^linear_weight must have input's dtype") as e:
        xent_triton.linear_token_logprobs(torch.randn(2, 4).to(BF16), torch.randn(5, 4),
                                          torch.zeros(2, dtype=torch.long))
    assert "student" not in str(e.value)


# ------------------------------------------------------------------ item 7: torch.compile
COMPILED = {
    "distillation_loss": lambda x, w, t, tok, T: xent_triton.distillation_loss(
        x @ w.t(), t, tok, temperature=T, ce_weight=0.25),
    "token_logprobs": lambda x, w, t, tok, T: xent_triton.token_logprobs(x @ w.t(), tok, temperature=T).sum(),
    "linear_distillation_loss": lambda x, w, t, tok, T: xent_triton.linear_distillation_loss(
        x, w, x.detach(), w.detach() * 0.5, tok, temperature=T, divergence="reverse_kl"),
    "linear_token_logprobs": lambda x, w, t, tok, T: xent_triton.linear_token_logprobs(
        x, w, tok, temperature=T, return_entropy=True)[1].sum(),
    # softcap (a Python float) and token_weight (a tensor) traced with a symbolic temperature
    "distillation_loss-softcap-token_weight": lambda x, w, t, tok, T: xent_triton.distillation_loss(
        x @ w.t(), t, tok, temperature=T, softcap=4.0, token_weight=t[:, 0].abs(), divergence="jsd"),
    "linear_token_logprobs-softcap-token_weight": lambda x, w, t, tok, T: xent_triton.linear_token_logprobs(
        x, w, tok, temperature=T, softcap=4.0, token_weight=t[:, 1].abs(), return_entropy=True)[0].sum(),
}


@pytest.mark.parametrize("fn", list(COMPILED))
def test_compile_fullgraph_dynamic(fn):
    """torch.compile(fullgraph=True, dynamic=True) traces the option checks (a symbolic
    temperature is never passed to math.isfinite) and matches eager."""
    torch._dynamo.reset()
    N, D, C = 5, 8, 40
    x, w, t = torch.randn(N, D), torch.randn(C, D), torch.randn(N, C)
    tok = torch.randint(0, C, (N,))
    f = COMPILED[fn]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for T in (0.7, 1.3):
        xe, xc = leaf(x), leaf(x)
        eager = f(xe, w, t, tok, T)
        eager.backward()
        out = compiled(xc, w, t, tok, T)
        out.backward()
        torch.testing.assert_close(out, eager)
        torch.testing.assert_close(xc.grad, xe.grad)


# ------------------------------------------------------------------ rows far below zero
@pytest.mark.parametrize("shift", [-100.0, -1e4])
def test_rows_entirely_below_minus_88(path, shift):
    """Every logit of a row below -88 (exp underflows to 0 against a reference of 0): the online
    log-sum-exp of core/formulas_triton.py once scaled its empty sum by exp(0 - ref) = inf, 0 * inf = NaN
    (the KL family and the CE heads alike)."""
    x = torch.randn(3, 100) * 2 + shift
    tok = torch.randint(0, 100, (3,))
    t = torch.randn(3, 100) * 2
    for name, ours, ref, theirs in (
        ("token_logprobs", xent_triton.token_logprobs(x, tok),
         F.log_softmax(x.double(), -1).gather(1, tok[:, None])[:, 0],
         F.log_softmax(x, -1).gather(1, tok[:, None])[:, 0]),
        ("cross_entropy", xent_triton.cross_entropy(x, tok, reduction="none"),
         F.cross_entropy(x.double(), tok, reduction="none"), F.cross_entropy(x, tok, reduction="none")),
        ("distillation_loss", xent_triton.distillation_loss(x, t, reduction="none", divergence="reverse_kl"),
         F.kl_div(F.log_softmax(t.double(), -1), F.log_softmax(x.double(), -1), log_target=True,
                  reduction="none").sum(-1),
         F.kl_div(F.log_softmax(t, -1), F.log_softmax(x, -1), log_target=True, reduction="none").sum(-1)),
    ):
        assert_close_rule(name, ours, theirs, ref, F32)
