"""The token-chunked linear head (xent_triton/linear/chunked.py): dW precision modes over many
chunks, the loss's consistency with the logits the GEMM actually produced, D = 0, and options."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from tolerances import assert_close_rule, rel_err
from xent_triton.linear import chunked

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64


def _inputs(N, D, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(C, D, generator=g) * (3.0 / D ** 0.5)).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    y[::7] = -100
    return x, w, y


def _grads(fn, x, w, y, **kw):
    xs, ws = (t.detach().clone().requires_grad_() for t in (x, w))
    loss = fn(xs, ws, y, **kw)
    loss.backward(torch.tensor(0.37, dtype=loss.dtype))
    return loss.detach(), xs.grad, ws.grad


def _torch(x, w, y, **kw):
    return F.cross_entropy(F.linear(x, w), y, label_smoothing=kw.get("label_smoothing", 0.0))


@pytest.mark.parametrize("accum", [pytest.param(None, id="fp32-accum"), pytest.param(BF16, id="bf16-accum")])
def test_dw_precision_modes_over_16_chunks(accum, record_property):
    """bf16 operands, 16 chunks of 8 rows: the fp32 accumulator meets the core tolerance rule; the
    bf16 accumulator is reported (its error grows with the number of chunks)."""
    N, D, C = 128, 64, 512
    x, w, y = _inputs(N, D, C, BF16)
    ref = _grads(_torch, x.double(), w.double(), y)
    theirs = _grads(_torch, x, w, y)
    ours = _grads(xent_triton.linear_cross_entropy, x, w, y, chunk_size=8, grad_accum_dtype=accum)
    err = rel_err(ours[2], ref[2])
    record_property("dW_rel_err", err)
    mode = "bf16" if accum else "fp32"
    print(f"\ndW relative error vs float64 ({mode} accumulation, 16 chunks): {err:.3e}; "
          f"torch bf16: {rel_err(theirs[2], ref[2]):.3e}")
    if accum is None:
        assert_close_rule("d_weight", ours[2], theirs[2], ref[2], BF16)
        assert_close_rule("d_input", ours[1], theirs[1], ref[1], BF16)
    else:
        assert ours[2].dtype == BF16 and err < 0.05


def test_grad_accum_dtype_validation():
    x, w, y = _inputs(4, 8, 10, F32)
    with pytest.raises(ValueError, match="grad_accum_dtype"):
        xent_triton.linear_cross_entropy(x, w, y, grad_accum_dtype=torch.float16)
    with pytest.raises(ValueError, match="chunk_size"):
        xent_triton.linear_cross_entropy(x, w, y, chunk_size=0)


def _round_mantissa(t: torch.Tensor, bits: int = 10) -> torch.Tensor:
    """Round fp32 to ``bits`` explicit mantissa bits (TF32 keeps 10), round-to-nearest-even."""
    i = t.float().contiguous().view(torch.int32)
    drop = 23 - bits
    half = 1 << (drop - 1)
    lsb = (i >> drop) & 1
    return ((i + half - 1 + lsb) & ~((1 << drop) - 1)).view(torch.float32)


def test_target_logit_comes_from_the_gemm_logits(monkeypatch):
    """Emulate TF32 GEMM inputs (X and W rounded to 10 mantissa bits inside the logits GEMM only):
    the loss must be the cross-entropy of exactly those logits (softmax and target logit from one
    buffer: every row's loss >= 0), not a mix with an exact target dot product."""
    real = chunked.logits_into

    def tf32_logits(out, xr, w, b):
        return real(out, _round_mantissa(xr), _round_mantissa(w), b)

    monkeypatch.setattr(chunked, "logits_into", tf32_logits)
    N, D, C = 64, 256, 300
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, D, generator=g) * 8
    w = torch.randn(C, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    z_tf32 = _round_mantissa(x).double() @ _round_mantissa(w).double().t()
    z_exact = x.double() @ w.double().t()
    y = z_tf32.argmax(1)  # confident rows: a wrong target logit would give loss < 0
    loss = xent_triton.linear_cross_entropy(x.requires_grad_(), w, y, reduction="sum", chunk_size=16)
    want = F.cross_entropy(z_tf32.float(), y, reduction="none")
    mixed = torch.logsumexp(z_tf32, 1) - z_exact.gather(1, y[:, None]).squeeze(1)
    assert (want >= 0).all()
    torch.testing.assert_close(loss.detach(), want.sum(), rtol=1e-5, atol=1e-3)
    assert (mixed.sum() - want.sum()).abs() > 1e-3  # the emulation does separate the two designs


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_zero_hidden_size(bias, reduction):
    """D = 0: the logits are the bias (or zeros), as torch computes them; gradients of the right shapes."""
    N, C = 6, 11
    x = torch.randn(N, 0, requires_grad=True)
    w = torch.randn(C, 0, requires_grad=True)
    b = torch.randn(C, requires_grad=True) if bias else None
    y = torch.randint(0, C, (N,))
    loss = xent_triton.linear_cross_entropy(x, w, y, linear_bias=b, reduction=reduction)
    logits = F.linear(x.detach(), w.detach(), b.detach() if bias else None)
    ref = F.cross_entropy(logits, y, reduction=reduction)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    assert x.grad.shape == (N, 0) and w.grad.shape == (C, 0)
    if bias:
        bb = b.detach().clone().requires_grad_()
        F.cross_entropy(F.linear(x.detach(), w.detach(), bb), y, reduction=reduction).sum().backward()
        torch.testing.assert_close(b.grad, bb.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [
    pytest.param(dict(lse_square_scale=1e-2), id="zloss-mean"),
    pytest.param(dict(lse_square_scale=1e-2, reduction="sum", label_smoothing=0.2), id="zloss-sum-smooth"),
    pytest.param(dict(empty_batch="zero", lse_square_scale=1e-2, weight=True), id="zloss-weights-empty-zero"),
])
def test_folded_zloss_matches_float64(kw):
    """The z-loss gradient folded into dZ (as an lse gradient scaled by den / n_valid) is exact."""
    kw = dict(kw)
    N, D, C = 40, 32, 200
    x, w, y = _inputs(N, D, C, F32, seed=5)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(C) + 0.5

    def ours(x, w, y):
        return xent_triton.linear_cross_entropy(x, w, y, chunk_size=9, **kw)

    def ref(x, w, y):
        cw = kw.get("weight")
        cw = cw.double() if cw is not None else None
        return xent_triton.cross_entropy(F.linear(x, w), y, **dict(kw, weight=cw))

    a = _grads(ours, x, w, y)
    r = _grads(ref, x.double(), w.double(), y)
    for name, u, v in zip(("loss", "d_input", "d_weight"), a, r):
        assert_close_rule(name, u, None, v, F32)
