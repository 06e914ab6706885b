"""Issue 21: ``grad_accum_dtype`` on the KL family's linear forms (``linear_distillation_loss``,
``linear_token_logprobs`` and their modules), with the CE linear head's semantics
(``core/options.check_chunking``): None / float32 sum dW, db across token chunks in fp32, the
head's own dtype sums them in it, anything else raises. Carried as ``KLOptions.accum_fp32`` across
the op schema (``kl/linear_ops.Grads``). Both CPU paths: the Triton kernels under the interpreter
and the torch path (``TRITON_INTERPRET=0``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from tolerances import assert_close_rule, rel_err

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64
N, D, DT, C, CHUNK = 41, 24, 20, 300, 5  # 9 token chunks, the last one short


def inputs(dtype):
    g = torch.Generator().manual_seed(21)
    h = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(C, D, generator=g) * (2.0 / D ** 0.5)).to(dtype)
    b = (torch.randn(C, generator=g) * 0.1).to(dtype)
    ht = torch.randn(N, DT, generator=g).to(dtype)
    wt = (torch.randn(C, DT, generator=g) * (2.0 / DT ** 0.5)).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    y[::6] = -100
    up = torch.rand(N, generator=g, dtype=F64) + 0.5  # upstream gradient != 1
    return h, w, b, ht, wt, y, up


def logits(h, w, b=None):
    """torch's logits: the GEMM in the inputs' dtype, then fp32 (float64 stays float64)."""
    z = F.linear(h, w, b)
    return z if z.dtype == F64 else z.float()


def distill(h, w, b, ht, wt, y, fused=True, **kw):
    """Per-token 0.8 KL(teacher || student) at T = 2 + 0.2 CE (ignored tokens 0)."""
    if fused:
        return xent_triton.linear_distillation_loss(h, w, ht, wt, y, linear_bias=b, reduction="none",
                                                    temperature=2.0, ce_weight=0.2, **kw)
    zs, zt = logits(h, w, b), logits(ht, wt)
    lq, lp = F.log_softmax(zs / 2.0, -1), F.log_softmax(zt / 2.0, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    ce = F.cross_entropy(zs, y, reduction="none")
    return torch.where(y != -100, 0.2 * ce + 0.8 * kl, torch.zeros_like(kl))


def logprobs(h, w, b, ht, wt, y, fused=True, **kw):
    tok = y.clamp(min=0)
    if fused:
        return xent_triton.linear_token_logprobs(h, w, tok, linear_bias=b, temperature=0.8, **kw)
    return torch.log_softmax(logits(h, w, b) / 0.8, -1).gather(-1, tok[:, None])[:, 0]


def grads(fn, h, w, b, ht, wt, y, up, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
    out = fn(*leaves, ht, wt, y, **kw)
    (out.double() * up).sum().backward()
    return [t.grad for t in leaves]


def reference(fn, dtype):
    """(float64 truth, torch's own in ``dtype``) of (dX, dW, db): the logits materialised."""
    h, w, b, ht, wt, y, up = inputs(dtype)
    truth = grads(fn, *(t.double() for t in (h, w, b, ht, wt)), y, up, fused=False)
    theirs = grads(fn, h, w, b, ht, wt, y, up, fused=False)
    return truth, theirs


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("fn", [distill, logprobs], ids=["linear_distillation_loss", "linear_token_logprobs"])
def test_grad_accum_dtype_over_many_chunks(fn, path, monkeypatch):
    """bf16 head, 9 chunks: None accumulates dW / db in fp32 (the tolerance rule vs float64); the
    head's dtype accumulates in bf16 (a different result, still close: its error grows with the
    chunks); float32 is None's result exactly."""
    if path == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, w, b, ht, wt, y, up = inputs(BF16)
    truth, theirs = reference(fn, BF16)
    fp32 = grads(fn, h, w, b, ht, wt, y, up, chunk_size=CHUNK)
    named = grads(fn, h, w, b, ht, wt, y, up, chunk_size=CHUNK, grad_accum_dtype=F32)
    acc16 = grads(fn, h, w, b, ht, wt, y, up, chunk_size=CHUNK, grad_accum_dtype=BF16)
    for name, a, t, r in zip(("d_input", "d_weight", "d_bias"), fp32, theirs, truth):
        assert a.dtype == BF16
        assert_close_rule(name, a, t, r, BF16)
    assert all(torch.equal(a, n) for a, n in zip(fp32, named))
    assert torch.equal(acc16[0], fp32[0])  # dX is per chunk: no accumulation
    for name, a, f, r in zip(("d_weight", "d_bias"), acc16[1:], fp32[1:], truth[1:]):
        assert a.dtype == BF16 and not torch.equal(a, f), f"{name}: bf16 accumulation not taken"
        assert rel_err(a, r) < 0.03, (name, rel_err(a, r))


def test_grad_accum_dtype_float64_head_is_float64():
    """A float64 head (the torch path) accumulates in float64 whatever is asked: float32 or float64."""
    h, w, b, ht, wt, y, up = inputs(F64)
    for fn in (distill, logprobs):
        truth = grads(fn, h, w, b, ht, wt, y, up, fused=False)
        for accum in (None, F32, F64):
            ours = grads(fn, h, w, b, ht, wt, y, up, chunk_size=CHUNK, grad_accum_dtype=accum)
            for name, a, r in zip(("d_input", "d_weight", "d_bias"), ours, truth):
                assert_close_rule(name, a, None, r, F64)


BAD = [
    pytest.param(F32, torch.int64, id="int64"),
    pytest.param(F32, BF16, id="bf16-for-fp32-head"),
    pytest.param(BF16, torch.float16, id="fp16-for-bf16-head"),
    pytest.param(F32, "float32", id="a-string"),
]


@pytest.mark.parametrize("fn", [distill, logprobs], ids=["linear_distillation_loss", "linear_token_logprobs"])
@pytest.mark.parametrize("dtype,accum", BAD)
def test_grad_accum_dtype_validation(fn, dtype, accum):
    h, w, b, ht, wt, y, _ = inputs(dtype)
    with pytest.raises(ValueError, match="grad_accum_dtype must be None, torch.float32 or linear_weight"):
        fn(h, w, b, ht, wt, y, grad_accum_dtype=accum)


def test_modules_take_grad_accum_dtype(monkeypatch):
    """The modules keep ``grad_accum_dtype``, pass it to the function (the torch path, bitwise), refuse
    a non-floating dtype at construction and one that does not fit the head at the call."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, w, b, ht, wt, y, up = inputs(BF16)
    crit = xent_triton.LinearDistillationLoss(temperature=2.0, ce_weight=0.2, reduction="none",
                                              chunk_size=CHUNK, grad_accum_dtype=BF16)
    lp = xent_triton.LinearTokenLogprobs(temperature=0.8, chunk_size=CHUNK, grad_accum_dtype=BF16)
    assert crit.grad_accum_dtype is BF16 and "grad_accum_dtype=torch.bfloat16" in repr(lp)
    by_module = grads(lambda h, w, b, ht, wt, y: crit(h, w, ht, wt, y, linear_bias=b), h, w, b, ht, wt, y, up)
    by_fn = grads(distill, h, w, b, ht, wt, y, up, chunk_size=CHUNK, grad_accum_dtype=BF16)
    assert all(torch.equal(a, f) for a, f in zip(by_module, by_fn))
    by_module = grads(lambda h, w, b, ht, wt, y: lp(h, w, y.clamp(min=0), linear_bias=b),
                      h, w, b, ht, wt, y, up)
    by_fn = grads(logprobs, h, w, b, ht, wt, y, up, chunk_size=CHUNK, grad_accum_dtype=BF16)
    assert all(torch.equal(a, f) for a, f in zip(by_module, by_fn))
    for cls in (xent_triton.LinearDistillationLoss, xent_triton.LinearTokenLogprobs):
        with pytest.raises(ValueError, match="grad_accum_dtype must be None"):
            cls(grad_accum_dtype=torch.int64)
        with pytest.raises(ValueError, match="grad_accum_dtype must be None"):
            cls(grad_accum_dtype="bfloat16")
    h32, w32 = h.float(), w.float()
    with pytest.raises(ValueError, match="grad_accum_dtype must be None"):
        lp(h32, w32, y.clamp(min=0))
