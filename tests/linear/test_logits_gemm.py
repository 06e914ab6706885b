"""The fused-epilogue logits GEMM (linear/gemm_kernels.py) under the interpreter vs float64.

Each case: 16-bit z (R, C) = T(x wᵀ + b) and per-(row, class tile) partials whose ``combine`` gives
the loss, for the first ``count`` rows (a device tensor). Interpreter tiles 32 x 64 x 32, so every
shape below has tail tiles in M, N and K.
"""
import pytest
import torch
import torch.nn.functional as F

from tolerances import assert_close_rule, rel_err
from xent_triton.core.options import LossOptions
from xent_triton.core.partials import combine
from xent_triton.core.runtime import interpreting
from xent_triton.linear.fused_epilogue import INTERPRET_GEMM, GemmConfig, logits_partials, n_class_tiles

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()),
                                reason="needs the Triton interpreter or a GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
IGN = -100


def _transform(a, scale, cap):
    a = a * scale
    return cap * torch.tanh(a / cap) if cap else a


def _inputs(R, K, C, dtype, ignored, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, K, generator=g).to(dtype)
    w = (torch.randn(C, K, generator=g) * 0.5).to(dtype)
    b = torch.randn(C, generator=g).to(dtype) if bias else None
    y = torch.randint(0, C, (R,), generator=g)
    y[torch.rand(R, generator=g) < ignored] = IGN
    return x.to(DEV), w.to(DEV), b if b is None else b.to(DEV), y.to(DEV)


def _logits(x, w, b, scale, cap, dtype):
    """T(x wᵀ + b) with x, w, b cast to ``dtype`` (float64: the reference)."""
    a = x.to(dtype) @ w.to(dtype).T
    if b is not None:
        a = a + b.to(dtype)
    return _transform(a, scale, cap)


def _loss(z, y, eps, cw):
    return F.cross_entropy(z, y, weight=None if cw is None else cw.to(z.dtype), reduction="none",
                           ignore_index=IGN, label_smoothing=eps)


# (R, K, C, dtype, count, softcap, logit_scale, bias, smoothing, class weights)
CASES = [
    (37, 45, 150, torch.bfloat16, 37, 0.0, 1.0, False, 0.0, False),   # 0 % ignored: full extent
    (37, 45, 150, torch.float16, 19, 0.0, 1.0, False, 0.0, False),    # 50 %: partial extent
    (37, 45, 150, torch.bfloat16, 0, 0.0, 1.0, False, 0.0, False),    # 100 %: empty extent
    (64, 70, 129, torch.bfloat16, 50, 30.0, 1.0, True, 0.0, False),   # softcap + bias
    (33, 97, 200, torch.float16, 33, 0.0, 0.6, False, 0.1, False),    # logit scale + smoothing
    (45, 33, 190, torch.bfloat16, 40, 20.0, 1.3, True, 0.2, True),    # everything at once
    (20, 16, 65, torch.float16, 99, 0.0, 1.0, False, 0.0, True),      # count > R: clamped to R
]


@pytest.mark.parametrize("R,K,C,dtype,count,cap,scale,bias,eps,weighted", CASES)
@pytest.mark.parametrize("cfg", [None, GemmConfig(16, 64, 32, 1, 2, 1, 1)], ids=["sub2", "sub1"])
def test_logits_gemm_matches_float64(R, K, C, dtype, count, cap, scale, bias, eps, weighted, cfg):
    x, w, b, y = _inputs(R, K, C, dtype, 0.2, bias)
    cw = torch.rand(C, generator=torch.Generator().manual_seed(1)).add(0.5).to(DEV) if weighted else None
    cnt = torch.tensor([count], device=DEV)
    z, part = logits_partials(x, w, y, cnt, bias=b, class_weight=cw, label_smoothing=eps,
                              logit_scale=scale, softcap=cap, config=cfg)
    n = min(count, R)
    assert z.dtype == dtype and part.shape == (n_class_tiles(C, cfg), R, 5)
    # rows >= count are not computed: still the poison (NaN) the test allocator wrote
    assert torch.isnan(z[n:].float()).all() and torch.isnan(part[:, n:]).all()
    if n == 0:
        return
    ref = _logits(x[:n], w, b, scale, cap, torch.float64)
    theirs = _logits(x[:n], w, b, scale, cap, dtype)
    assert_close_rule("z", z[:n], theirs, ref, dtype)
    opts = LossOptions.make(ignore_index=IGN, label_smoothing=eps, softcap=cap or None,
                            logit_scale=scale)
    loss, lse, _ = combine(part[:, :n], y[:n], cw, C, opts)
    assert_close_rule("loss", loss, _loss(theirs.float(), y[:n], eps, cw), _loss(ref, y[:n], eps, cw),
                      dtype)
    assert_close_rule("lse", lse, torch.logsumexp(theirs.float(), 1), torch.logsumexp(ref, 1), dtype)


@pytest.mark.parametrize("num_progs", [1, 3, 7])
def test_logits_gemm_persistent_grid_is_exact(num_progs):
    """Fewer programs than tiles (each loops over several, grouped by GROUP_M): bitwise the same
    as one program per tile."""
    x, w, _, y = _inputs(50, 40, 300, torch.bfloat16, 0.0, False, seed=3)
    cnt = torch.tensor([50], device=DEV)
    z1, p1 = logits_partials(x, w, y, cnt)
    z2, p2 = logits_partials(x, w, y, cnt, num_progs=num_progs)
    assert torch.equal(z1, z2) and torch.equal(p1, p2)


def test_logits_gemm_loss_accuracy_at_large_logits():
    """|z| ~ 60, bf16 operands: the loss from the fp32-accumulator partials is within 2x the error
    of the vendor path (fp32 logits from the same bf16 operands, then the loss in fp32), although
    the logits buffer is bf16 (spacing 0.25 at 60: a loss from the rounded buffer is far worse)."""
    R, K, C = 48, 64, 256
    x, w, _, y = _inputs(R, K, C, torch.bfloat16, 0.0, False, seed=5)
    w = (w.float() * 60 / (x.float() @ w.float().T).abs().amax()).to(torch.bfloat16)
    cnt = torch.tensor([R], device=DEV)
    z, part = logits_partials(x, w, y, cnt)
    ref_z = x.double() @ w.double().T
    assert ref_z.abs().amax() > 50
    ref = _loss(ref_z, y, 0.0, None)
    loss, _, _ = combine(part, y, None, C, LossOptions.make(ignore_index=IGN))
    vendor = _loss(x.float() @ w.float().T, y, 0.0, None)
    from_buffer = _loss(z.float(), y, 0.0, None)
    e_ours, e_vendor = rel_err(loss, ref), rel_err(vendor, ref)
    assert e_ours <= 2 * max(e_vendor, 1e-7), (e_ours, e_vendor)
    assert rel_err(from_buffer, ref) > 20 * e_ours  # what the fp32 epilogue is for


def test_logits_gemm_interpreter_tiles_leave_tails():
    """The table above has tail tiles in M (the count), N and K at the interpreter's tiles."""
    cfg = INTERPRET_GEMM
    assert all(K % cfg.block_k and C % cfg.block_n for _, K, C, *_ in CASES)
    assert any(min(n, R) % cfg.block_m and min(n, R) > cfg.block_m for R, _, _, _, n, *_ in CASES)


# dX / dW GEMMs of the fused head (fused_epilogue.dx_gemm / dw_gemm): (R, C, D, dtype, count,
# scale, acc (an earlier chunk's fp32 partial sum), db). Interpreter tiles 32 x 32 x 32: tails in
# every extent; rows >= count of dZ and X are NaN (never read), dX rows >= count must come out 0.
BWD_CASES = [
    (45, 70, 37, torch.bfloat16, 30, 0.37, False, True),
    (45, 70, 37, torch.float16, 45, None, True, True),
    (33, 129, 50, torch.bfloat16, 0, 0.5, True, True),     # nothing kept: zeros / acc only
    (20, 65, 40, torch.float16, 99, 2.0, False, False),    # count > R: clamped
]


@pytest.mark.parametrize("R,C,D,dtype,count,scale,with_acc,with_db", BWD_CASES)
def test_dx_dw_gemms_match_float64(R, C, D, dtype, count, scale, with_acc, with_db):
    from xent_triton.linear.fused_epilogue import dw_gemm, dx_gemm
    g = torch.Generator().manual_seed(7)
    n = min(count, R)
    dz = torch.randn(R, C, generator=g).to(dtype)
    x = torch.randn(R, D, generator=g).to(dtype)
    w = (torch.randn(C, D, generator=g) / 4).to(dtype)
    dz[n:] = float("nan")
    x[n:] = float("nan")
    dz, x, w = dz.to(DEV), x.to(DEV), w.to(DEV)
    cnt = torch.tensor([count], device=DEV)
    s = torch.tensor([scale], device=DEV) if scale is not None else None
    k = 1.0 if scale is None else scale
    dx = dx_gemm(dz, w, cnt, torch.full((R, D), float("nan"), dtype=dtype, device=DEV), scale=s)
    assert torch.equal(dx[n:], torch.zeros_like(dx[n:]))
    if n:
        ref = k * (dz[:n].double() @ w.double())
        assert_close_rule("dx", dx[:n], k * (dz[:n] @ w).double(), ref, dtype)
    acc = torch.randn(C, D, generator=g).to(DEV) if with_acc else None
    db0 = torch.randn(C, generator=g).to(DEV)
    db = db0.clone() if with_db else None
    dw = dw_gemm(dz, x, cnt, torch.full((C, D), float("nan"), dtype=dtype, device=DEV), acc=acc, db=db,
                 scale=s)
    prod = dz[:n].double().T @ x[:n].double()
    ref = k * (prod + (acc.double() if with_acc else 0))
    theirs = k * ((dz[:n].T @ x[:n]).double() + (acc.double() if with_acc else 0))
    assert_close_rule("dw", dw, theirs, ref, dtype)
    if with_db:
        ref_db = dz[:n].double().sum(0) + (db0.double() if with_acc else 0)
        assert_close_rule("db", db, dz[:n].float().sum(0).double() + (db0.double() if with_acc else 0),
                          ref_db, torch.float32)
