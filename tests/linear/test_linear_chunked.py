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


COMPACTION_CASES = [  # (path, kwargs): issue 20 — ignored tokens compacted before the GEMMs
    pytest.param("triton", dict(), id="chunked-one-chunk-interpreter"),
    pytest.param("torch", dict(), id="chunked-one-chunk-plain-cpu"),
    pytest.param("triton", dict(chunk_size=7, reduction="sum", label_smoothing=0.1), id="chunked-7-rows-sum"),
    pytest.param("triton", dict(reduction="none"), id="per-token-interpreter"),
    pytest.param("torch", dict(reduction="none"), id="per-token-plain-cpu"),
]


@pytest.mark.parametrize("path,kw", COMPACTION_CASES)
def test_compacted_heads_are_exact_and_deterministic(path, kw, monkeypatch):
    """Half the tokens ignored at random (N = 45, D = 24, C = 300, bf16, upstream gradient != 1):
    loss, dX, dW within the tolerance rule of float64, bitwise equal run to run, ignored rows' dX
    exactly 0; and the default one-chunk dW comes back in w's dtype."""
    if path == "torch":
        monkeypatch.setattr(chunked, "uses_triton", lambda x: False)
        from xent_triton.linear import ops as linear_ops
        monkeypatch.setattr(linear_ops, "uses_triton", lambda x: False)
    N, D, C = 45, 24, 300
    x, w, y = _inputs(N, D, C, BF16, seed=3)
    y[torch.randperm(N, generator=torch.Generator().manual_seed(1))[:N // 2]] = -100
    red = kw.get("reduction", "mean")
    up = torch.rand(N, dtype=F64) + 0.5 if red == "none" else torch.tensor(0.37, dtype=F64)

    def run(fn, xx, ww, **k):
        xs, ws = (t.detach().clone().requires_grad_() for t in (xx, ww))
        loss = fn(xs, ws, y, **k)
        loss.backward(up.to(loss.dtype))
        return loss.detach(), xs.grad, ws.grad

    def torch_head(xx, ww, yy, **k):
        return F.cross_entropy(F.linear(xx, ww), yy, reduction=red,
                               label_smoothing=kw.get("label_smoothing", 0.0))

    ref = run(torch_head, x.double(), w.double())
    theirs = run(torch_head, x, w)
    ours = [run(xent_triton.linear_cross_entropy, x, w, **kw) for _ in range(2)]
    for name, a, t, r in zip(("loss", "d_input", "d_weight"), ours[0], theirs, ref):
        assert_close_rule(name, a, t, r, BF16)
    assert all(torch.equal(a, b) for a, b in zip(*ours)), "not deterministic run to run"
    assert (ours[0][1][y == -100] == 0).all()
    assert ours[0][2].dtype == BF16


@pytest.mark.parametrize("kw", [pytest.param(dict(), id="token-chunked"),
                                pytest.param(dict(reduction="none"), id="per-token")])
def test_compile_dynamic_traces_compacting_heads_once(kw):
    """torch.compile(fullgraph=True, dynamic=True): the compaction's host sync lives inside the
    custom ops (fixed output shapes), so both heads trace with no graph break and batches of other
    sizes and other ignored fractions run without a recompile, matching eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def step(x, w, y):
        out = xent_triton.linear_cross_entropy(x, w, y, **kw)
        return out.sum() * 1.5

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=cnt, fullgraph=True, dynamic=True)
    first = None
    for N, ignored in ((40, 10), (56, 40), (33, 0)):
        x, w, y = _inputs(N, 16, 200, BF16, seed=N)
        y[:ignored] = -100
        runs = []
        for fn in (compiled, step):
            xs, ws = (t.clone().requires_grad_() for t in (x, w))
            out = fn(xs, ws, y)
            out.backward()
            runs.append((out.detach(), xs.grad, ws.grad))
        assert all(torch.equal(a, b) for a, b in zip(*runs))
        first = cnt.frame_count if first is None else first
    assert cnt.frame_count == first, f"recompiled: {first} -> {cnt.frame_count} graphs"
