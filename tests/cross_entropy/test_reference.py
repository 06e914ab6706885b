"""The truth and the torch path: ``reference.cross_entropy_composed`` and
``forward_rows_torch``/``backward_rows_torch``.

1. ``cross_entropy_composed`` equals ``F.cross_entropy`` itself (loss and gradient, float64) whenever
   the extras are off, and its extras match the formulas of cross_entropy/kernels.py written out by
   hand; so the correctness tests compare against something trustworthy.
2. The chunked pure-torch fallback (what CPU tensors run without ``TRITON_INTERPRET``, and what
   float64 always runs) matches the composed truth per row (loss, lse, row weight and gradient),
   across chunk boundaries (C > CHUNK_C), and end to end through the public API.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cases import BF16, F16, F32, F64, assert_rule, check, class_ids, class_weight, logits, probabilities
from reference import cross_entropy_composed
from xent_triton.core import row_blocks
from xent_triton.core.inputs import canonical, check_weight
from xent_triton.core.options import LossOptions
from xent_triton.core.runtime import uses_triton
from xent_triton.cross_entropy import rows_torch


def _inputs(shape, device, *, soft=False, weight=False, ignore_index=-100, frac=0.25, dtype=F64, scale=1.0):
    x = logits(shape, dtype, device, scale=scale)
    C = x.shape[0] if x.dim() == 1 else x.shape[1]
    y = probabilities(x) if soft else class_ids(x, ignore_index=ignore_index, ignore_frac=frac)
    w = class_weight(C, dtype, device).to(dtype) if weight else None
    return x, y, w


def _grad(fn, x: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xin = x.detach().clone().requires_grad_()
    out = fn(xin)
    out.backward(up)
    return out.detach(), xin.grad


# --- 1a. composed == F.cross_entropy with the extras off ---------------------------------------------
PLAIN = [
    pytest.param((32, 50), {}, id="N32-C50"),
    pytest.param((32, 50), dict(weight=True), id="N32-C50-weight"),
    pytest.param((32, 50), dict(ignore_index=5), id="N32-C50-ignore5"),
    pytest.param((32, 50), dict(weight=True, ignore_index=5), id="N32-C50-weight-ignore5"),
    pytest.param((32, 50), dict(frac=1.0, weight=True), id="N32-C50-all-ignored"),
    pytest.param((4, 50, 3, 2), dict(weight=True), id="N4-C50-3x2-weight"),
    pytest.param((50,), dict(frac=0.0), id="C50-1d"),
    pytest.param((32, 50), dict(soft=True), id="N32-C50-soft"),
    pytest.param((32, 50), dict(soft=True, weight=True), id="N32-C50-soft-weight"),
    pytest.param((4, 50, 3), dict(soft=True, weight=True), id="N4-C50-d3-soft-weight"),
]


@pytest.mark.parametrize("smoothing", [0.0, 0.15], ids=["nosmooth", "smooth0.15"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,kw", PLAIN)
def test_composed_equals_torch(device, shape, kw, reduction, smoothing):
    kw = dict(kw)
    ign = kw.get("ignore_index", -100)
    x, y, w = _inputs(shape, device, **kw)
    opts = dict(ignore_index=ign, reduction=reduction, label_smoothing=smoothing)
    up = torch.rand(F.cross_entropy(x, y, w, **opts).shape, dtype=F64, device=device) + 0.5
    ours, g_ours = _grad(lambda t: cross_entropy_composed(t, y, w, **opts), x, up)
    want, g_want = _grad(lambda t: F.cross_entropy(t, y, w, **opts), x, up)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(g_ours, g_want, rtol=1e-12, atol=1e-12)
    if kw.get("frac") == 1.0 and reduction == "mean":
        assert torch.isnan(ours) and torch.all(g_ours == 0)


# --- 1b. composed == the documented formulas, extras included ------------------------------------------
def _formula(x, y, w, ignore_index, reduction, eps, zl, softcap, scale):
    """Loss per cross_entropy/kernels.py's docstring, written with explicit sums (float64)."""
    cdim = 0 if x.dim() == 1 else 1
    z = x * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z.movedim(cdim, -1)  # (..., C)
    C = z.shape[-1]
    wv = w if w is not None else torch.ones(C, dtype=z.dtype, device=z.device)
    lse = torch.logsumexp(z, -1)
    if y.is_floating_point():
        t = y.movedim(cdim, -1) * (1 - eps) + eps / C
        loss = (wv * t * (lse[..., None] - z)).sum(-1) + zl * lse**2
        denom = lse.numel()
    else:
        valid = y != ignore_index
        ys = torch.where(valid, y, torch.zeros_like(y))
        z_y = z.gather(-1, ys[..., None])[..., 0]
        ce = (1 - eps) * wv[ys] * (lse - z_y) + eps / C * (wv * (lse[..., None] - z)).sum(-1)
        ce = torch.where(valid, ce, torch.zeros_like(ce))
        zrow = torch.where(valid, zl * lse**2, torch.zeros_like(lse))
        denom = torch.where(valid, wv[ys], torch.zeros_like(lse)).sum()
        # the z-loss is a per-token mean over the non-ignored tokens under "mean"
        mean = ce.sum() / denom + (zrow.sum() / valid.sum() if zl else 0.0)
        return {"none": ce + zrow, "sum": (ce + zrow).sum(), "mean": mean}[reduction], lse
    return {"none": loss, "sum": loss.sum(), "mean": loss.sum() / denom}[reduction], lse


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,kw,opts", [
    pytest.param((16, 40), dict(weight=True), dict(lse_square_scale=0.1), id="weight-zloss"),
    pytest.param((16, 40), dict(ignore_index=5), dict(label_smoothing=0.2, softcap=2.0),
                 id="ignore5-smooth-softcap"),
    pytest.param((16, 40), dict(weight=True),
                 dict(label_smoothing=0.1, logit_scale=1.7, lse_square_scale=1e-2, softcap=3.0),
                 id="weight-smooth-scale-zloss-softcap"),
    pytest.param((4, 40, 3), dict(soft=True, weight=True),
                 dict(label_smoothing=0.1, lse_square_scale=1e-2, logit_scale=0.5),
                 id="kdim-soft-weight-smooth-zloss"),
    pytest.param((40,), dict(frac=0.0), dict(lse_square_scale=0.1, softcap=1.5), id="1d-zloss-softcap"),
])
def test_composed_extras_match_formula(device, shape, kw, opts, reduction):
    x, y, w = _inputs(shape, device, scale=2.0, **kw)
    ign = kw.get("ignore_index", -100)
    got, lse = cross_entropy_composed(x, y, w, ign, reduction, return_lse=True, **opts)
    want, lse_want = _formula(x, y, w, ign, reduction, opts.get("label_smoothing", 0.0),
                              opts.get("lse_square_scale", 0.0), opts.get("softcap"),
                              opts.get("logit_scale", 1.0))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_want, rtol=1e-12, atol=1e-12)


# --- 2a. forward_rows_torch / backward_rows_torch against the composed truth --------------------------
ROWS = [
    pytest.param((32, 1000), {}, {}, 64, id="N32-C1000-chunk64"),
    pytest.param((32, 1000), dict(weight=True, ignore_index=5), dict(label_smoothing=0.1), 64,
                 id="N32-C1000-chunk64-weight-ignore5-smooth"),
    pytest.param((32, 1000), dict(weight=True),
                 dict(lse_square_scale=1e-2, softcap=5.0, logit_scale=1.5, dlse=True),
                 100, id="N32-C1000-chunk100-weight-zloss-softcap-scale-dlse"),
    pytest.param((32, 1000), dict(soft=True, weight=True),
                 dict(label_smoothing=0.1, lse_square_scale=1e-2, dlse=True),
                 64, id="N32-C1000-chunk64-soft-weight-smooth-zloss-dlse"),
    pytest.param((4, 300, 5), dict(weight=True), dict(label_smoothing=0.2, dlse=True), 64,
                 id="N4-C300-D5-chunk64"),
    pytest.param((4, 300, 5), dict(soft=True), dict(label_smoothing=0.1), 64, id="N4-C300-D5-chunk64-soft"),
    pytest.param((8, 20000), dict(weight=True), dict(label_smoothing=0.1, lse_square_scale=1e-3), None,
                 id="N8-C20000-realchunk-weight-smooth-zloss"),
    pytest.param((32, 1000), dict(frac=1.0), dict(lse_square_scale=1e-2, dlse=True), 64,
                 id="N32-all-ignored-dlse"),
    pytest.param((32, 1000), dict(scale=1e4), dict(label_smoothing=0.1), 64, id="N32-C1000-huge"),
]


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("shape,kw,opts,chunk", ROWS)
def test_rows_fallback_matches_composed(device, monkeypatch, shape, kw, opts, chunk, dtype):
    if chunk is not None:
        monkeypatch.setattr(row_blocks, "CHUNK_C", chunk)
    assert shape[1] > row_blocks.CHUNK_C  # several chunks, the last one ragged
    samples = shape[1] * (shape[2] if len(shape) == 3 else 1)
    monkeypatch.setattr(row_blocks, "BLOCK_ELEMS", 3 * samples)  # blocks of 3 samples, the last ragged
    opts = dict(opts)
    use_dlse = opts.pop("dlse", False)
    kw = dict(kw)
    ign = kw.get("ignore_index", -100)
    x, y, w = _inputs(shape, device, dtype=dtype, **kw)
    dead = not y.is_floating_point() and not opts.get("label_smoothing")
    if dead:  # a row whose first chunks are all -inf (smoothing or soft targets would make it inf)
        x[1, :200] = float("-inf")
        y[1] = torch.where(y[1] == ign, y[1], torch.full_like(y[1], 250))
    can = canonical(x, y)
    x3, tgt, C = can.x3, can.target, can.C
    wk = check_weight(w, C, x.device, x.dtype)
    # rows carry no z-loss (options.reduce_rows adds it from the lse): compare rows without it
    ls, zl = opts.get("label_smoothing", 0.0), 0.0
    sc, scale = opts.get("softcap", 0.0), opts.get("logit_scale", 1.0)
    ropts = LossOptions.make(ignore_index=ign, label_smoothing=ls, softcap=sc or None, logit_scale=scale)
    loss, lse, stats = rows_torch.forward_rows_torch(x3, tgt, wk, ropts)
    cdt = F64 if dtype == F64 else F32
    assert loss.dtype == lse.dtype == stats.dtype == cdt and stats.shape == (x3.shape[0] * x3.shape[2], 3)

    g = (torch.randn(loss.shape, device=device).to(dtype).to(cdt))
    h = (torch.randn(loss.shape, device=device).to(dtype).to(cdt)) if use_dlse else None
    copts = dict(ignore_index=ign, label_smoothing=ls, lse_square_scale=zl, softcap=sc or None,
                 logit_scale=scale)
    truth, theirs = {}, {}
    for dt, store in ((F64, truth), (dtype, theirs)):
        xin = x.detach().to(dt).requires_grad_()
        yin = y.to(dt) if y.is_floating_point() else y
        l_none, l_lse = cross_entropy_composed(xin, yin, None if w is None else w.to(dt), reduction="none",
                                               return_lse=True, **copts)
        obj = (l_none.reshape(-1) * g.to(dt)).sum()
        if h is not None:
            obj = obj + (l_lse.reshape(-1) * h.to(dt)).sum()
        obj.backward()
        store.update(loss=l_none.detach().reshape(-1), lse=l_lse.detach().reshape(-1), grad=xin.grad)
        if dt == F64:
            store["mean"] = cross_entropy_composed(x.double(), y.double() if y.is_floating_point() else y,
                                                   None if w is None else w.double(), **copts)
    assert_rule("rows loss", loss, theirs["loss"], truth["loss"], dtype)
    assert_rule("rows lse", lse, theirs["lse"], truth["lse"], dtype)
    # the mean's denominator is the sum of the row weights (w_y or 0 for hard targets, rows for soft)
    mean = loss.sum() / (stats[:, 2].sum() if not y.is_floating_point() else loss.numel())
    assert_rule("rows mean", mean, None, truth["mean"], dtype)
    if not y.is_floating_point():
        ignored = tgt == ign
        assert torch.all(loss[ignored] == 0) and torch.all(stats[ignored, 2] == 0)

    for inplace in (False, True):
        out = x3.clone() if inplace else torch.full_like(x3, float("nan"))
        src = out if inplace else x3
        rows_torch.backward_rows_torch(src, tgt, wk, stats, g, h, ropts, out)
        grad = out.reshape(x.shape) if x.dim() != 2 else out[..., 0]
        assert_rule("rows grad" + (" inplace" if inplace else ""), grad, theirs["grad"], truth["grad"], dtype)
        if h is None and not y.is_floating_point():
            rows = grad.movedim(1, -1).reshape(-1, C)
            assert torch.all(rows[tgt == ign] == 0)
    if dead:
        assert torch.all(grad[1, :200] == 0)  # -inf logits get exactly zero gradient


# --- 2b. the public API on the fallback path --------------------------------------------------------
@pytest.mark.parametrize("shape,dtype,spec", [
    pytest.param((16, 1000), F32, dict(ignore_frac=0.25, weight=True, label_smoothing=0.1),
                 id="fp32-weight-smooth"),
    pytest.param((16, 1000), BF16,
                 dict(ignore_frac=0.25, lse_square_scale=1e-2, use_lse=True, reduction="none"),
                 id="bf16-zloss-lse-used-none"),
    pytest.param((16, 1000), F16, dict(softcap=5.0, logit_scale=2.0, inplace_backward=True, reduction="sum"),
                 id="fp16-softcap-scale-inplace-sum"),
    pytest.param((8, 20000), BF16, dict(soft=True, label_smoothing=0.1, weight=True), id="bf16-C20000-soft"),
    pytest.param((4, 300, 3, 2), F32, dict(ignore_frac=0.25, ignore_index=5, use_lse=True),
                 id="fp32-kdim-ignore5"),
    pytest.param((300,), BF16, dict(weight=True), id="bf16-1d"),
    pytest.param((16, 1000), F64,
                 dict(ignore_frac=0.25, weight=True, label_smoothing=0.1, lse_square_scale=1e-2,
                                       softcap=4.0, use_lse=True, reduction="none"), id="fp64-all-none"),
    pytest.param((4, 300, 5), F64, dict(soft=True, weight=True, reduction="sum"), id="fp64-kdim-soft"),
])
def test_public_api_cpu_fallback(monkeypatch, shape, dtype, spec):
    """CPU tensors without TRITON_INTERPRET (and float64 anywhere) take the reference path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    spec = dict(spec)
    x = logits(shape, dtype, "cpu", scale=2.0)
    assert not uses_triton(x)
    C = shape[0] if len(shape) == 1 else shape[1]
    soft, frac = spec.pop("soft", False), spec.pop("ignore_frac", 0.0)
    y = (probabilities(x) if soft
         else class_ids(x, ignore_index=spec.get("ignore_index", -100), ignore_frac=frac))
    w = class_weight(C, dtype, "cpu") if spec.pop("weight", False) else None
    check(x, y, w, **spec)

