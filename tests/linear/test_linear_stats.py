"""``return_stats`` / ``return_predicted`` and ``token_weight`` of the fused linear head, on both CPU
paths (Triton interpreter and the torch twins), on its two algorithms: the token-chunked scalar path
(mean / sum with a gradient) and the per-token path (``reduction="none"``, ``return_lse``, or no
gradient), against float64 torch (``F.cross_entropy(F.linear(...))``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xent_triton as xt
from tolerances import assert_close_rule

PATHS = [pytest.param("1", id="triton"), pytest.param("0", id="torch")]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", request.param)
    return request.param


def _inputs(N, D, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(C, D, generator=g) * (3.0 / D ** 0.5)).to(dtype)
    b = (torch.randn(C, generator=g) * 0.5).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    y[::7] = -100
    tw = torch.rand(N, generator=g) * 1.5 + 0.25
    cw = torch.rand(C, generator=g) + 0.5
    return x, w, b, y, tw, cw


def _logits(x, w, b, dtype, softcap=None, logit_scale=1.0):
    z = F.linear(x.to(dtype), w.to(dtype), b.to(dtype) if b is not None else None) * logit_scale
    return softcap * torch.tanh(z / softcap) if softcap is not None else z


def _composed(x, w, b, y, dtype, reduction, cw=None, tw=None, zl=0.0, eps=0.0, softcap=None, logit_scale=1.0):
    """Truth (dtype float64) or torch's own result in ``dtype``: the documented token-weight mean
    sum_r t_r ce_r / sum_r t_r w_y + zl sum_r t_r lse_r^2 / sum_valid t_r."""
    z = _logits(x, w, b, dtype, softcap, logit_scale)
    cwd = cw.to(dtype) if cw is not None else None
    ce = F.cross_entropy(z, y, weight=cwd, reduction="none", label_smoothing=eps)
    valid = y != -100
    lse = z.logsumexp(1)
    zrow = zl * torch.where(valid, lse * lse, torch.zeros_like(lse))
    t = tw.to(dtype) if tw is not None else torch.ones_like(ce)
    rows = (ce + zrow) * t
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    w_y = cwd[y.clamp(min=0)] if cwd is not None else torch.ones_like(ce)
    den = torch.where(valid, w_y * t, torch.zeros_like(t)).sum()
    return (ce * t).sum() / den + (zrow * t).sum() / torch.where(valid, t, torch.zeros_like(t)).sum()


# ------------------------------------------------------------------------------------ stats
STATS_CASES = [
    pytest.param(32, 24, 300, torch.float32, "scalar", {}, id="N32-D24-C300-fp32-chunked"),
    pytest.param(32, 24, 300, torch.float32, "scalar",
                 dict(softcap=5.0, logit_scale=1.7, label_smoothing=0.1),
                 id="N32-D24-C300-fp32-chunked-softcap-scale-smooth"),
    pytest.param(20, 16, 1031, torch.bfloat16, "scalar", dict(softcap=8.0),
                 id="N20-D16-C1031-bf16-chunked-softcap"),
    pytest.param(32, 24, 300, torch.float32, "none", dict(logit_scale=0.6),
                 id="N32-D24-C300-fp32-none-scale"),
    pytest.param(32, 24, 300, torch.float32, "lse", dict(softcap=5.0), id="N32-D24-C300-fp32-lse-softcap"),
    pytest.param(17, 8, 513, torch.float32, "nograd", dict(label_smoothing=0.2),
                 id="N17-D8-C513-fp32-nograd-smooth"),
]


@pytest.mark.parametrize("N,D,C,dtype,mode,opts", STATS_CASES)
def test_stats_match_float64(path, N, D, C, dtype, mode, opts):
    x, w, b, y, _, _ = _inputs(N, D, C, dtype)
    z = _logits(x, w, b, torch.float64, opts.get("softcap"), opts.get("logit_scale", 1.0))
    y[1] = int(z[1].argmax())  # at least one correct token
    xs, ws, bs = (t.clone().requires_grad_(mode != "nograd") for t in (x, w, b))
    out = xt.linear_cross_entropy(xs, ws, y, linear_bias=bs, reduction="none" if mode == "none" else "mean",
                                  return_lse=mode == "lse", return_stats=True, return_predicted=True,
                                  chunk_size=7, **opts)
    st = out[-1]
    assert len(out) == (3 if mode == "lse" else 2)
    valid = y != -100
    logp = z.log_softmax(1)
    ent = -(logp.exp() * logp).sum(1)
    pred = z.argmax(1)
    assert st.n_valid.item() == valid.sum().item()
    assert st.predicted.shape == y.shape and st.predicted.dtype == torch.int64
    assert (st.predicted == pred).float().mean() > 0.95  # 16-bit ties may flip an argmax
    assert st.n_correct.item() == ((st.predicted == y) & valid).sum().item() >= 1
    tol = (1e-2 if dtype == torch.bfloat16 else 1e-5) * ent[valid].sum().item() + 1e-4
    assert abs(st.entropy_sum.item() - ent[valid].sum().item()) <= tol
    plain = xt.linear_cross_entropy(x, w, y, linear_bias=b, reduction="none" if mode == "none" else "mean",
                                    return_stats=True, **opts)
    assert plain[1].predicted is None
    if mode != "nograd":  # the stats leave the loss and its gradients alone
        ref = xt.linear_cross_entropy(*(t.clone().requires_grad_() for t in (x, w)), y, linear_bias=b,
                                      reduction="none" if mode == "none" else "mean", chunk_size=7, **opts)
        torch.testing.assert_close(out[0].detach(), ref.detach(), rtol=0, atol=0)
        out[0].sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (xs, ws, bs))


# ----------------------------------------------------------------------------- token weights
TW_CASES = [
    pytest.param(red, cw, zl, eps, id=f"{red}-{'cw' if cw else 'nocw'}-zl{zl}-eps{eps}")
    for red in ("none", "sum", "mean") for cw in (False, True) for zl in (0.0, 1e-2)
    for eps in ((0.0, 0.1) if cw and zl else (0.0,))
]


@pytest.mark.parametrize("reduction,class_weight,zl,eps", TW_CASES)
def test_token_weight_matches_float64(path, reduction, class_weight, zl, eps):
    x, w, b, y, tw, cw = _inputs(29, 20, 211, torch.float32, seed=1)
    cw = cw if class_weight else None
    kw = dict(reduction=reduction, lse_square_scale=zl, label_smoothing=eps, softcap=6.0)
    g = torch.randn(29, dtype=torch.float64) if reduction == "none" else torch.tensor(0.37).double()
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    loss = xt.linear_cross_entropy(xs, ws, y, linear_bias=bs, weight=cw, token_weight=tw, chunk_size=5, **kw)
    gx, gw, gb = torch.autograd.grad((loss * g.float()).sum(), (xs, ws, bs))

    def composed(dtype):
        ts = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        out = _composed(*ts, y, dtype, reduction, cw, tw, zl, eps, softcap=6.0)
        return (out, *torch.autograd.grad((out * g.to(dtype)).sum(), ts))

    ref, theirs = composed(torch.float64), composed(torch.float32)
    for name, ours, t32, t64 in zip(("loss", "dx", "dW", "db"), (loss, gx, gw, gb), theirs, ref):
        assert_close_rule(name, ours, t32, t64, torch.float32)


def test_token_weight_of_ones_is_the_unweighted_loss(path):
    x, w, b, y, _, cw = _inputs(24, 16, 150, torch.float32, seed=2)
    for red in ("mean", "sum"):
        xs = x.clone().requires_grad_()
        a = xt.linear_cross_entropy(xs, w, y, weight=cw, reduction=red, lse_square_scale=1e-3,
                                    token_weight=torch.ones(24))
        b_ = xt.linear_cross_entropy(xs, w, y, weight=cw, reduction=red, lse_square_scale=1e-3)
        torch.testing.assert_close(a, b_, rtol=1e-6, atol=0)


def test_token_weight_gradient_reaches_the_weights(path):
    """A token_weight that requires grad takes the per-token path: its gradient is autograd's."""
    x, w, b, y, tw, cw = _inputs(21, 12, 97, torch.float32, seed=3)
    tws = tw.clone().requires_grad_()
    xs = x.clone().requires_grad_()
    loss = xt.linear_cross_entropy(xs, w, y, weight=cw, lse_square_scale=1e-2, token_weight=tws)
    gt, gx = torch.autograd.grad(loss, (tws, xs))
    t64, x64 = tw.double().requires_grad_(), x.double().requires_grad_()
    ref = _composed(x64, w.double(), None, y, torch.float64, "mean", cw, t64, 1e-2)
    rt, rx = torch.autograd.grad(ref, (t64, x64))
    assert_close_rule("loss", loss, None, ref, torch.float32)
    assert_close_rule("d token_weight", gt, None, rt, torch.float32)
    assert_close_rule("dx", gx, None, rx, torch.float32)


@pytest.mark.parametrize("bad,err", [
    pytest.param(torch.ones(5), ValueError, id="wrong-shape"),
    pytest.param(torch.ones(8, dtype=torch.int64), TypeError, id="integer"),
])
def test_token_weight_validation(bad, err):
    x, w, _, y, _, _ = _inputs(8, 4, 10, torch.float32)
    with pytest.raises(err, match="token_weight"):
        xt.linear_cross_entropy(x, w, y, token_weight=bad)


# return_stats / token_weight with a process_group: refused after the options agreement, alike on
# every rank (given on one rank only: the same ValueError everywhere):
# tests/parallel/test_distributed_hangs.py
# (w2-return-stats-or-token-weight-one-rank, w4-refused-option-one-rank-then-soft-target-grad).


# ------------------------------------------------------------------------------------ traffic
@pytest.mark.parametrize("ignored", [pytest.param(False, id="no-ignored"), pytest.param(True, id="ignored")])
def test_stats_add_no_logit_read_in_the_chunked_path(ignored):
    """return_stats reads nothing more in the token-chunked path: the entropy and argmax come from
    pass 1 of chunk_loss_grad_kernel (ignored rows are then read once too, for ``predicted``)."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("traffic counts Triton kernels only under the CPU interpreter")
    from harness import traffic
    N, C = 24, 300
    x, w, b, y, _, _ = _inputs(N, 16, C, torch.float32)
    if not ignored:
        y = y.clamp(min=0)
    reads = []
    for stats in (False, True):
        xs = x.clone().requires_grad_()
        with traffic.count() as r:
            xt.linear_cross_entropy(xs, w, y, linear_bias=b, return_stats=stats, chunk_size=8)
        reads.append(r["kernel_read"])
    n_ignored = int((y == -100).sum())
    # fp32 logits of the ignored rows, pass 1 only; + their target id and z_y (8 + 4 bytes): without
    # stats the ignored rows are compacted away (issue 20) and no program runs for them
    assert reads[1] - reads[0] == n_ignored * (C * 4 + 12)


def test_module_forwards_stats_and_token_weight():
    x, w, b, y, tw, _ = _inputs(12, 8, 40, torch.float32)
    crit = xt.LinearCrossEntropyLoss(reduction="sum", return_stats=True, return_predicted=True)
    loss, st = crit(x, w, y, linear_bias=b, token_weight=tw)
    ref, ref_st = xt.linear_cross_entropy(x, w, y, linear_bias=b, reduction="sum", token_weight=tw,
                                          return_stats=True, return_predicted=True)
    torch.testing.assert_close(loss, ref)
    assert torch.equal(st.predicted, ref_st.predicted) and st.n_valid == ref_st.n_valid
