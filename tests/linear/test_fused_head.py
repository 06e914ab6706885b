"""The linear head on the fused-epilogue GEMM (linear/fused_head.py) under the interpreter:
forward + backward vs float64 within the tolerance rule, with the vendor-GEMM head (the package
default) as the "torch's own error" side; no device -> host transfer; FLOPs; workspace bytes.
"""
import contextlib
import gc

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from harness import traffic
from tolerances import assert_close_rule
from xent_triton.core.runtime import interpreting
from xent_triton.linear.fused_epilogue import BwdConfig, GemmConfig
from xent_triton.linear.fused_head import linear_cross_entropy_fused

pytestmark = pytest.mark.skipif(not interpreting(), reason="the interpreter's CPU checks")
IGN = -100


def _inputs(N, D, C, dtype, frac, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(C, D, generator=g) / D ** 0.5 * 2).to(dtype)
    b = (torch.randn(C, generator=g) * 0.5).to(dtype) if bias else None
    y = torch.randint(0, C, (N,), generator=g)
    y[torch.randperm(N, generator=g)[:round(frac * N)]] = IGN
    return x, w, b, y


def _run(fn, x, w, b, y, g, **kw):
    """(loss, dx, dw, db) of fn with upstream gradient g (float64 copies for the reference)."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if b is not None else None
    loss = fn(x, w, b, y, **kw)
    loss.backward(g.to(loss.dtype))
    return loss.detach(), x.grad, w.grad, None if b is None else b.grad


def _ref(x, w, b, y, *, softcap=None, logit_scale=1.0, weight=None, **kw):
    z = F.linear(x, w, b) * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, y, weight=None if weight is None else weight.double(), ignore_index=IGN, **kw)


def _fused(x, w, b, y, **kw):
    return linear_cross_entropy_fused(x, w, y, bias=b, **kw)


def _vendor(x, w, b, y, **kw):
    return xent_triton.linear_cross_entropy(x, w, y, linear_bias=b, **kw)


# (N, D, C, dtype, ignored fraction, chunk_rows, options): tail tiles in every GEMM extent (the
# interpreter's tiles are 32 rows / 64 classes / 32 features; the dX / dW GEMMs 32 x 32 x 32)
CASES = [  # + bias
    (40, 37, 150, torch.bfloat16, 0.0, None, dict(), True),
    (40, 37, 150, torch.float16, 0.5, 16, dict(reduction="sum"), False),     # 3 chunks, 50 % ignored
    (40, 37, 150, torch.bfloat16, 0.5, 16, dict(), True),                     # mean, 3 chunks
    (40, 37, 150, torch.bfloat16, 1.0, None, dict(reduction="sum"), True),   # everything ignored
    (40, 37, 150, torch.float16, 1.0, 16, dict(empty_batch="zero"), False),  # mean of nothing: 0
    (33, 50, 129, torch.bfloat16, 0.3, 16, dict(softcap=15.0, logit_scale=0.8), True),
    (33, 50, 129, torch.float16, 0.2, None, dict(label_smoothing=0.1, weight="w"), True),
]


@pytest.mark.parametrize("N,D,C,dtype,frac,chunk,kw,bias", CASES)
def test_fused_head_matches_vendor_path(N, D, C, dtype, frac, chunk, kw, bias):
    x, w, b, y = _inputs(N, D, C, dtype, frac, bias)
    ref_kw = {k: v for k, v in kw.items() if k != "empty_batch"}
    if kw.get("weight") == "w":
        kw = dict(kw, weight=torch.rand(C, generator=torch.Generator().manual_seed(2)) + 0.5)
        ref_kw = dict(ref_kw, weight=kw["weight"])
    g = torch.tensor(0.7)
    ours = _run(_fused, x, w, b, y, g, chunk_rows=chunk, **kw)
    theirs = _run(_vendor, x, w, b, y, g, **kw)
    ref = _run(_ref, x.double(), w.double(), None if b is None else b.double(), y, g.double(), **ref_kw)
    if kw.get("empty_batch") == "zero":  # torch has no such option: its mean of nothing is NaN
        ref = (torch.zeros((), dtype=torch.float64),) + ref[1:]
    for name, o, t, r in zip(("loss", "dx", "dw", "db"), ours, theirs, ref):
        if r is not None:
            assert_close_rule(name, o, t, r, dtype)


def test_fused_head_reduction_none_rows():
    """reduction="none": the per-row losses (no gradient) of the fused path vs float64."""
    x, w, b, y = _inputs(37, 33, 140, torch.bfloat16, 0.4, True, seed=9)
    ours = _fused(x, w, b, y, reduction="none", chunk_rows=16)
    theirs = _vendor(x, w, b, y, reduction="none")
    ref = _ref(x.double(), w.double(), b.double(), y, reduction="none")
    assert not ours.requires_grad
    assert_close_rule("loss rows", ours, theirs, ref, torch.bfloat16)


@contextlib.contextmanager
def _no_host_sync():
    """Tensor.item / tolist / nonzero / __bool__ / __int__ / __float__, torch.nonzero and
    torch.cuda.synchronize raise inside the block (the triton interpreter's own conversions of
    launch arguments go through numpy, not these)."""
    def boom(*a, **k):
        raise AssertionError("device -> host transfer")
    names = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    saved_nz, saved_sync = torch.nonzero, torch.cuda.synchronize
    try:
        for n in saved:
            setattr(torch.Tensor, n, boom)
        torch.nonzero = torch.cuda.synchronize = boom
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        torch.nonzero, torch.cuda.synchronize = saved_nz, saved_sync


def test_fused_head_flops_and_no_host_sync(record_property):
    """Half the tokens ignored (random positions), two chunks: every GEMM of forward + backward
    (logits, dX, dW: tl.dot tiles, no aten GEMM) runs on the kept rows only, with no device ->
    host transfer: FLOPs <= 1.02 x (1 - f) 6NDC (tiles divide the kept rows, D and C: exact)."""
    N, D, C, frac = 64, 64, 256, 0.5
    x, w, _, y = _inputs(N, D, C, torch.bfloat16, frac, False, seed=4)
    x.requires_grad_(), w.requires_grad_()
    with traffic.count() as r, _no_host_sync():
        _fused(x, w, None, y, config=GemmConfig(32, 64, 32, 1, 2, 1, 1), chunk_rows=32).backward()
    ratio = r["flops"] / (6 * N * D * C)
    record_property("flop_ratio", ratio)
    print(f"\nfused head, {frac:.0%} ignored: FLOPs = {ratio:.4f} x 6NDC")
    assert ratio <= 1.02 * (1 - frac)
    assert ratio >= 0.98 * (1 - frac)
    assert r["oob"] == []


def _peak(N, C, cfg):
    x, w, _, y = _inputs(N, 16, C, torch.bfloat16, 0.0, False, seed=6)
    x.requires_grad_(), w.requires_grad_()

    def step():
        # dX / dW tiles as large as the shapes allow: few interpreted steps (their outputs cancel)
        _fused(x, w, None, y, config=cfg, chunk_rows=N, bwd_config=BwdConfig(64, 16, 256, 1, 1, 1)).backward()
        x.grad = w.grad = None
    gc.collect()
    return traffic.peak_extra_bytes(step)


def test_fused_head_workspace_bytes_per_logit(record_property):
    """Peak extra bytes, one chunk, bf16, GPU partial width (256 classes per partial): the mixed
    difference P(2N, 2C) - P(2N, C) - P(N, 2C) + P(N, C) = N·C x bytes per chunk logit (the dX,
    dW, input-sized terms cancel) <= 2.1 B (2 B buffer + 20/256 B partials)."""
    cfg = GemmConfig(16, 256, 16, 1, 2, 1, 1)
    N, C = 32, 512
    mixed = _peak(2 * N, 2 * C, cfg) - _peak(2 * N, C, cfg) - _peak(N, 2 * C, cfg) + _peak(N, C, cfg)
    per_logit = mixed / (N * C)
    record_property("bytes_per_logit", per_logit)
    print(f"\nfused head: {per_logit:.3f} B per chunk logit")
    assert per_logit <= 2.1


def test_dispatch_table_picks_the_faster_path():
    from perf.fused_dispatch import FUSED, VENDOR, dispatch_rows
    rows = [dict(N=8, D=4, C=16, ignored=f, provider=p, median_ms=ms)
            for f, p, ms in ((0.0, VENDOR, 2.0), (0.0, FUSED, 1.5), (0.5, VENDOR, 1.0), (0.5, FUSED, 1.2),
                             (0.9, VENDOR, 1.0), (0.9, FUSED, ""), (0.0, "other", 0.1))]
    got = [(r["ignored"], r["path"]) for r in dispatch_rows(rows, "card")]
    assert got == [(0.0, "fused"), (0.5, "vendor")]


def test_every_loss_option_has_a_verdict():
    """Each LossOptions field is honoured or refused by name (a new field fails here first)."""
    import dataclasses

    from xent_triton.core.options import LossOptions
    from xent_triton.linear.fused_head import FUSED_OPTIONS
    assert set(FUSED_OPTIONS) == {f.name for f in dataclasses.fields(LossOptions)}
    x, w, _, y = _inputs(8, 16, 40, torch.bfloat16, 0.0, False)
    for name, ok in FUSED_OPTIONS.items():
        if not ok:
            with pytest.raises(ValueError, match=name):
                _fused(x, w, None, y, **{name: 0.5})
