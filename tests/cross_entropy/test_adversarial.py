"""Adversarial cases found by trying the library as a new user would (issue #13), each run on both
CPU paths: the Triton kernels under the interpreter ("triton", what CUDA runs) and the pure-torch
fallback ("torch", CPU tensors without TRITON_INTERPRET). Every case failed (wrong number, crash or
missing error) before the fix it names."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import xent_triton as xt
from reference import cross_entropy_composed
from xent_triton.core.inputs import canonical

PATHS = [pytest.param("1", id="triton"), pytest.param("0", id="torch")]
N, C = 8, 100


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", request.param)
    return request.param


def _t(n=N, c=C):
    return torch.randint(0, c, (n,))


# --- 1. inplace_backward tells autograd (version counter) ----------------------------------------

INPLACE_CONFLICTS = [
    pytest.param(lambda a, t: xt.cross_entropy(torch.exp(a), t, inplace_backward=True).backward(),
                 id="logits-from-exp"),
    pytest.param(lambda a, t: xt.cross_entropy(torch.softmax(a, 1), t, inplace_backward=True).backward(),
                 id="logits-from-softmax"),
    pytest.param(lambda a, t: xt.cross_entropy(torch.tanh(a), t, inplace_backward=True).backward(),
                 id="logits-from-tanh"),
    pytest.param(lambda a, t: (lambda x: ((x ** 2).sum() + xt.cross_entropy(x, t, inplace_backward=True))
                               .backward())(a * 1.0), id="logits-also-squared"),
]


@pytest.mark.parametrize("program", INPLACE_CONFLICTS)
def test_inplace_backward_conflict_raises(path, program):
    a = torch.randn(N, C, requires_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        program(a, _t())


def test_inplace_backward_retain_graph_twice_raises(path):
    x = torch.randn(N, C, requires_grad=True) * 1.0
    loss = xt.cross_entropy(x, _t(), inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_backward_same_logits_two_losses(path):
    """Either autograd raises (the other loss needed the logits) or the gradient is right."""
    a = torch.randn(N, C, requires_grad=True)
    t1, t2 = _t(), _t()
    x = a * 2.0
    try:
        (xt.cross_entropy(x, t1, inplace_backward=True) + xt.cross_entropy(x, t2)).backward()
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e)
        return
    ad = a.detach().double().requires_grad_()
    (F.cross_entropy(ad * 2, t1) + F.cross_entropy(ad * 2, t2)).backward()
    torch.testing.assert_close(a.grad.double(), ad.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["leaf", "expanded"])
def test_inplace_backward_refused_with_warning(path, kind):
    t = _t()
    if kind == "leaf":
        p = torch.randn(N, C, requires_grad=True)
        x = p
    else:  # stride-0 rows: an in-place gradient would overlap
        p = torch.randn(1, C, requires_grad=True)
        x = p.expand(N, C)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        xt.cross_entropy(x, t, inplace_backward=True).backward()
    assert any("inplace_backward ignored" in str(w.message) for w in rec)
    pd = p.detach().double().requires_grad_()
    F.cross_entropy(pd if kind == "leaf" else pd.expand(N, C), t).backward()
    torch.testing.assert_close(p.grad.double(), pd.grad, atol=1e-6, rtol=1e-5)
    assert p.grad.data_ptr() != p.data_ptr(), "the gradient must not share the parameter's storage"


def test_inplace_backward_still_right_and_in_place(path):
    a = torch.randn(N, C, requires_grad=True)
    x = a * 3.0
    ptr = x.data_ptr()
    seen = {}
    x.register_hook(lambda g: seen.update(ptr=g.data_ptr()))
    t = _t()
    xt.cross_entropy(x, t, inplace_backward=True).backward()
    assert seen["ptr"] == ptr, "the gradient was written into the logits' storage"
    ad = a.detach().double().requires_grad_()
    F.cross_entropy(ad * 3.0, t).backward()
    torch.testing.assert_close(a.grad.double(), ad.grad, atol=1e-6, rtol=1e-5)


# --- 2. double backward: a clear error, never a wrong number -------------------------------------
@pytest.mark.parametrize("head", ["logits", "linear"])
def test_double_backward_raises(path, head):
    t = _t()
    if head == "logits":
        x = torch.randn(N, C, requires_grad=True)
        loss = xt.cross_entropy(x, t)
    else:
        x = torch.randn(N, 16, requires_grad=True)
        loss = xt.linear_cross_entropy(x, torch.randn(C, 16, requires_grad=True), t)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives are not implemented"):
        (g * g).sum().backward()


# --- 3. large softcap keeps its precision --------------------------------------------------------
@pytest.mark.parametrize("s", [1e5, 1e6, 1e30], ids=["s1e5", "s1e6", "s1e30"])
def test_large_softcap(path, s):
    x = torch.randn(16, 1000) * 3
    t = torch.randint(0, 1000, (16,))
    ref = F.cross_entropy(s * torch.tanh(x.double() / s), t)
    assert abs(xt.cross_entropy(x, t, softcap=s).item() - ref.item()) < 1e-5
    h, w = torch.randn(16, 32), torch.randn(1000, 32)
    ref = F.cross_entropy(s * torch.tanh((h.double() @ w.double().t()) / s), t)
    assert abs(xt.linear_cross_entropy(h, w, t, softcap=s).item() - ref.item()) < 1e-4 * ref.item()


# --- 4 / 8. torch.compile: dynamic shapes, and the CPU target check -------------------------------
def test_compile_dynamic_fullgraph(path):
    x = torch.randn(N, C, requires_grad=True)
    h, w = torch.randn(N, 16, requires_grad=True), torch.randn(C, 16, requires_grad=True)
    t = _t()

    @torch.compile(fullgraph=True, dynamic=True, backend="aot_eager")
    def both(x, h, w, t, ls):
        return xt.cross_entropy(x, t, label_smoothing=ls) + xt.linear_cross_entropy(h, w, t)

    got = both(x, h, w, t, 0.1)
    ref = (F.cross_entropy(x.double(), t, label_smoothing=0.1)
           + F.cross_entropy(h.double() @ w.double().t(), t))
    assert abs(got.item() - ref.item()) < 1e-4
    got.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("head", ["logits", "linear"])
def test_compile_keeps_cpu_target_check(path, head):
    t = _t()
    t[3] = C + 7
    if head == "logits":
        fn = torch.compile(lambda x, t: xt.cross_entropy(x, t), fullgraph=True, backend="aot_eager")
        args = (torch.randn(N, C),)
    else:
        fn = torch.compile(lambda h, w, t: xt.linear_cross_entropy(h, w, t), fullgraph=True,
                           backend="aot_eager")
        args = (torch.randn(N, 16), torch.randn(C, 16))
    with pytest.raises(IndexError, match="out of bounds"):
        fn(*args, t)


# --- 5. linear_cross_entropy under torch.autocast -----------------------------------------------
def test_linear_under_autocast(path):
    w = torch.randn(C, 32, requires_grad=True)  # fp32 master weight
    h = torch.randn(N, 32).bfloat16().requires_grad_()
    t = _t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = xt.linear_cross_entropy(h, w, t)
    ref = F.cross_entropy(F.linear(h.double(), w.detach().bfloat16().double()), t)
    assert abs(loss.item() - ref.item()) < 1e-2 * ref.item()
    loss.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.bfloat16


# --- 6. inputs torch accepts ---------------------------------------------------------------------
def test_uint8_targets(path):
    x = torch.randn(N, 200)
    t = torch.randint(0, 200, (N,), dtype=torch.uint8)
    torch.testing.assert_close(xt.cross_entropy(x, t), F.cross_entropy(x, t.long()))
    h, w = torch.randn(N, 16), torch.randn(200, 16)
    torch.testing.assert_close(xt.linear_cross_entropy(h, w, t), F.cross_entropy(h @ w.t(), t.long()),
                               atol=1e-5, rtol=1e-5)


def test_ignore_index_none_and_float(path):
    x, t = torch.randn(N, C), _t()
    t[2] = -100
    h, w = torch.randn(N, 16), torch.randn(C, 16)
    torch.testing.assert_close(xt.linear_cross_entropy(h, w, t, ignore_index=None),
                               F.cross_entropy(h @ w.t(), t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xt.cross_entropy(x, t, ignore_index=None), F.cross_entropy(x, t))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        xt.cross_entropy(x, t, ignore_index=2.5)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        xt.linear_cross_entropy(h, w, t, ignore_index=2.5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_rows_kdim(path, reduction):
    x = torch.randn(0, 5, 3, requires_grad=True)
    t = torch.zeros(0, 3, dtype=torch.long)
    got = xt.cross_entropy(x, t, reduction=reduction)
    ref = F.cross_entropy(x.detach(), t, reduction=reduction)
    assert got.shape == ref.shape
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.nan_to_num(), ref.nan_to_num())
    got.sum().backward()
    assert x.grad.shape == x.shape


# --- 7. K-dim logits whose spatial dims merge only in another order: no copy -------------------------
def test_kdim_permuted_spatial_no_copy(path):
    base = torch.randn(2, 50, 4, 3)
    x = base.permute(0, 1, 3, 2)  # (2, 50, 3, 4), H and W swapped: .view cannot merge them
    t = torch.randint(0, 50, (2, 3, 4))
    can = canonical(x, t)
    assert can.x3.data_ptr() == base.data_ptr() and can.x3.untyped_storage().data_ptr() == \
        base.untyped_storage().data_ptr(), "the (N, C, D) view shares the logits' storage"
    got = xt.cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(got, F.cross_entropy(x, t, reduction="none"))
    a = base.clone().requires_grad_()
    xi = (a * 1.0).permute(0, 1, 3, 2)
    xt.cross_entropy(xi, t, inplace_backward=True, label_smoothing=0.1).backward()
    ad = base.double().requires_grad_()
    F.cross_entropy(ad.permute(0, 1, 3, 2), t, label_smoothing=0.1).backward()
    torch.testing.assert_close(a.grad.double(), ad.grad, atol=1e-6, rtol=1e-5)


# --- 10. z-loss is a per-token mean, independent of the class weights' scale ----------------------
@pytest.mark.parametrize("head", ["logits", "linear"])
def test_zloss_independent_of_weight_scale(path, head):
    x, t = torch.randn(N, C), _t()
    t[1] = -100
    w = torch.rand(C) + 0.5
    h, lw = torch.randn(N, 16), torch.randn(C, 16)

    def loss(weight):
        if head == "logits":
            return xt.cross_entropy(x, t, weight=weight, lse_square_scale=1e-2)
        return xt.linear_cross_entropy(h, lw, t, weight=weight, lse_square_scale=1e-2)

    torch.testing.assert_close(loss(w), loss(w * 0.1), atol=1e-5, rtol=1e-5)
    z = x.double() if head == "logits" else h.double() @ lw.double().t()
    ref = cross_entropy_composed(z, t, w.double(), lse_square_scale=1e-2)
    lse = torch.logsumexp(z, 1)[t != -100]
    assert math.isclose(ref.item(), (F.cross_entropy(z, t, w.double()) + 1e-2 * (lse ** 2).mean()).item())
    assert abs(loss(w).item() - ref.item()) < 1e-4
