"""Metrics from the loss's own pass (``return_stats``), per-token weights (``token_weight``) and
fully ignored batches (``empty_batch``), on both CPU paths, against float64 torch."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import xent_triton as xt

PATHS = [pytest.param("1", id="triton"), pytest.param("0", id="torch")]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", request.param)
    return request.param


def _z64(x, cdim, softcap, scale):
    z = x.double() * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z.movedim(cdim, -1)


STATS_CASES = [
    pytest.param((16, 1000), torch.float32, {}, id="N16-C1000-fp32"),
    pytest.param((16, 1000), torch.bfloat16, dict(softcap=20.0, logit_scale=1.5),
                 id="N16-C1000-bf16-softcap-scale"),
    pytest.param((4, 300, 5), torch.float32, dict(label_smoothing=0.1), id="N4-C300-D5-fp32-smooth"),
    pytest.param((8, 50257), torch.bfloat16, {}, id="N8-C50257-bf16"),
]


@pytest.mark.parametrize("shape,dtype,opts", STATS_CASES)
def test_return_stats_matches_float64(path, shape, dtype, opts):
    x = (torch.randn(shape) * 3).to(dtype)
    cdim = 1
    t = torch.randint(0, shape[1], (shape[0],) + shape[2:])
    t.view(-1)[::5] = -100
    first = t.view(-1)[1:2]
    z = _z64(x, cdim, opts.get("softcap"), opts.get("logit_scale", 1.0))
    first.fill_(int(z.reshape(-1, shape[1])[1].argmax()))  # at least one correct token
    loss, lse, st = xt.cross_entropy(x, t, return_lse=True, return_stats=True, return_predicted=True, **opts)
    valid = t != -100
    logp = z.log_softmax(-1)
    ent = -(logp.exp() * logp).sum(-1)
    pred = z.argmax(-1)
    assert st.n_valid.item() == valid.sum().item()
    assert st.n_correct.item() == ((pred == t) & valid).sum().item() >= 1
    assert abs(st.entropy_sum.item() - ent[valid].sum().item()) <= 1e-5 * ent[valid].sum().item() + 1e-4
    # bf16 ties: the argmax may differ only where two logits are equal after rounding
    assert st.predicted.shape == t.shape
    same = st.predicted == pred
    assert same.float().mean() > 0.99
    plain = xt.cross_entropy(x, t, return_lse=True, **opts)
    assert torch.equal(plain[0], loss) and torch.equal(plain[1], lse)


def test_stats_off_returns_plain_and_predicted_none(path):
    x, t = torch.randn(8, 100), torch.randint(0, 100, (8,))
    loss, st = xt.cross_entropy(x, t, return_stats=True)
    assert st.predicted is None and loss.dim() == 0


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1", reason="interpreter traffic counter")
def test_stats_add_no_pass_over_the_logits():
    from harness import traffic

    x, t = torch.randn(16, 4096, dtype=torch.bfloat16), torch.randint(0, 4096, (16,))
    with traffic.count() as plain:
        xt.cross_entropy(x, t)
    with traffic.count() as withs:
        xt.cross_entropy(x, t, return_stats=True)
    logits_bytes = x.numel() * x.element_size()
    assert plain["kernel_read"] >= logits_bytes
    assert withs["kernel_read"] == plain["kernel_read"]
    assert withs["kernel_write"] - plain["kernel_write"] == 16 * (4 + 8)  # entropy fp32 + argmax int64


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [pytest.param({}, id="plain"), pytest.param(dict(weight=True), id="weight"),
                                  pytest.param(dict(label_smoothing=0.1, lse_square_scale=1e-2),
                                               id="smooth-zloss")])
def test_token_weight(path, reduction, opts):
    opts = dict(opts)
    x = torch.randn(12, 200, requires_grad=True)
    t = torch.randint(0, 200, (12,))
    t[3] = -100
    tw = torch.rand(12) + 0.1
    w = torch.rand(200) + 0.5 if opts.pop("weight", False) else None
    zl = opts.pop("lse_square_scale", 0.0)
    got = xt.cross_entropy(x, t, w, reduction=reduction, token_weight=tw, lse_square_scale=zl, **opts)
    xd = x.detach().double().requires_grad_()
    valid = t != -100
    ce = F.cross_entropy(xd, t, None if w is None else w.double(), reduction="none", **opts)
    zrow = torch.where(valid, zl * torch.logsumexp(xd, 1) ** 2, torch.zeros(12, dtype=torch.float64))
    wy = (w.double()[t.clamp(min=0)] if w is not None else torch.ones(12, dtype=torch.float64)) * valid
    if reduction == "none":
        ref = (ce + zrow) * tw
    elif reduction == "sum":
        ref = ((ce + zrow) * tw).sum()
    else:
        ref = (ce * tw).sum() / (wy * tw).sum() + ((zrow * tw).sum() / (tw * valid).sum() if zl else 0.0)
    torch.testing.assert_close(got.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    up = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    (got * up.float()).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("head", ["logits", "linear"])
def test_empty_batch_zero(path, head):
    t = torch.full((6,), -100)
    if head == "logits":
        x = torch.randn(6, 50, requires_grad=True)
        nan = xt.cross_entropy(x, t)
        zero = xt.cross_entropy(x, t, empty_batch="zero")
        params = [x]
    else:
        h, w = torch.randn(6, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
        nan = xt.linear_cross_entropy(h, w, t)
        zero = xt.linear_cross_entropy(h, w, t, empty_batch="zero")
        params = [h, w]
    assert torch.isnan(nan) and zero.item() == 0.0 and zero.grad_fn is not None
    zero.backward()
    for p in params:
        assert p.grad is not None and torch.all(p.grad == 0)
