"""Regression tests of issue 18 for the CE heads (items 1, 15, 16, 18), on both CPU paths: the
Triton kernels under the interpreter (what CUDA runs) and the pure-torch path. Each is a mutant
the suite let through before (see docs/testing.md): a silent zero second derivative of the
linear head, the argmax block merge (``>`` -> ``>=``), the z-loss denominator's empty-batch
guard, the linear head's bias gradient summed over token chunks. The vocabulary-parallel /
DTensor halves of item 1 run in tests/parallel/test_distributed_hangs.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from tolerances import assert_close_rule
from xent_triton.core import launch
from xent_triton.cross_entropy import ops as ce_ops
from xent_triton.linear import chunked as linear_chunked
from xent_triton.linear import ops as linear_ops

F32, F64 = torch.float32, torch.float64
PATHS = ["triton", "torch"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """"triton": the kernels under the interpreter; "torch": the pure-torch path of both heads."""
    if request.param == "torch":
        for mod in (ce_ops, linear_ops, linear_chunked):
            monkeypatch.setattr(mod, "uses_triton", lambda x: False)
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- item 1: second derivatives
# (id, kwargs, which operand requires grad): every linear-head path of one device
SECOND = [
    ("token-chunked-frozen-W", dict(), "h"),
    ("token-chunked-dW", dict(chunk_size=3), "W"),
    ("token-chunked-db", dict(), "b"),
    ("per-token-none", dict(reduction="none"), "h"),
    ("per-token-lse", dict(return_lse=True), "h"),
]


@pytest.mark.parametrize("cid,kw,wrt", [pytest.param(*c, id=c[0]) for c in SECOND])
def test_linear_head_second_derivative_raises(cid, kw, wrt, path):
    """A Hessian-vector product through the linear head raises the documented error
    (docs/guarantees.md) instead of a silent zero: the token-chunked head forms its gradients in
    forward, so before the fix its first derivative was a constant for autograd."""
    g = _gen(1)
    h = torch.randn(7, 5, generator=g, dtype=F32)
    W = torch.randn(11, 5, generator=g, dtype=F32)
    b = torch.randn(11, generator=g, dtype=F32)
    y = torch.randint(0, 11, (7,), generator=g)
    ops = dict(h=h, W=W, b=b)
    ops[wrt].requires_grad_()
    out = xent_triton.linear_cross_entropy(h, W, y, linear_bias=b, **kw)
    loss = out[0].sum() + out[1].sum() if isinstance(out, tuple) else out.sum()
    (grad,) = torch.autograd.grad(loss * 0.7, ops[wrt], create_graph=True)
    v = torch.randn(grad.shape, generator=g)
    with pytest.raises(RuntimeError, match="second derivatives are not implemented"):
        torch.autograd.grad((grad * v).sum(), ops[wrt])


KL_LINEAR = [
    ("linear_distillation_loss", lambda h, W, t, y: xent_triton.linear_distillation_loss(h, W, t, W, y)),
    ("linear_distillation_loss-none",
     lambda h, W, t, y: xent_triton.linear_distillation_loss(h, W, t, W, y, reduction="none")),
    ("linear_token_logprobs", lambda h, W, t, y: xent_triton.linear_token_logprobs(h, W, y)),
]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32-triton", "fp64-torch"])
@pytest.mark.parametrize("cid,fn", [pytest.param(*c, id=c[0]) for c in KL_LINEAR])
def test_kl_linear_forms_second_derivative_still_raises(cid, fn, dtype):
    """The KL family's linear forms raise today; they must keep raising (float64 takes their torch
    path, float32 the kernels under the interpreter)."""
    g = _gen(2)
    h = torch.randn(6, 5, generator=g, dtype=dtype, requires_grad=True)
    W = torch.randn(13, 5, generator=g, dtype=dtype)
    t = torch.randn(6, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 13, (6,), generator=g)
    (grad,) = torch.autograd.grad(fn(h, W, t, y).sum() * 0.7, h, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives are not implemented"):
        torch.autograd.grad((grad * 1.3).sum(), h)


# ----------------------------------------------------- item 15: argmax ties across blocks
BLOCK = 16


def _tie_logits(N: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer-valued logits (exact in fp32 in any summation order) whose row maximum 9 sits,
    exactly equal, at a column of block 0 or 1 and again at a column of a later block."""
    g = _gen(15)
    z = torch.randint(-8, 8, (N, C), generator=g).to(F32) / 4
    first = torch.randint(0, 2 * BLOCK, (N,), generator=g)
    second = torch.randint(2 * BLOCK + 1, C, (N,), generator=g)
    z[torch.arange(N), first] = 9.0
    z[torch.arange(N), second] = 9.0
    return z, first


@pytest.mark.parametrize("head", ["cross_entropy", "linear_cross_entropy"])
def test_argmax_ties_across_column_blocks_pick_the_first_index(head, path):
    """``predicted`` equals torch.argmax (the first index of the maximum) exactly when the
    maximum appears in two column blocks (blocks of 16 classes forced; C = 77: 5 blocks)."""
    N, C = 12, 77
    z, first = _tie_logits(N, C)
    y = torch.randint(0, C, (N,), generator=_gen(3))
    with launch.overrides(block_c=BLOCK):
        if head == "cross_entropy":
            x = z.clone().requires_grad_()
            _, st = xent_triton.cross_entropy(x, y, return_stats=True, return_predicted=True)
        else:  # h = [z, 1] with W = [I, 0]: the GEMM reproduces z exactly (one nonzero product per sum)
            h = torch.cat([z, torch.ones(N, 1)], 1).requires_grad_()
            W = torch.cat([torch.eye(C), torch.zeros(C, 1)], 1).requires_grad_()
            _, st = xent_triton.linear_cross_entropy(h, W, y, return_stats=True, return_predicted=True)
    assert torch.equal(z.argmax(1), first)
    assert torch.equal(st.predicted, first), (st.predicted, first)


# ------------------------------------------------ item 16: all ignored, z-loss, mean, zero
@pytest.mark.parametrize("head", ["cross_entropy", "linear_cross_entropy"])
def test_all_ignored_batch_with_zloss_mean_zero_is_exactly_zero(head, path):
    """Every token ignored, lse_square_scale > 0, reduction mean, empty_batch="zero": the loss is
    exactly 0 and every gradient exactly 0 (the z-loss's own denominator is guarded too)."""
    g = _gen(16)
    N, C, D = 9, 37, 6
    y = torch.full((N,), -100)
    opts = dict(lse_square_scale=1e-2, reduction="mean", empty_batch="zero")
    if head == "cross_entropy":
        x = torch.randn(N, C, generator=g).requires_grad_()
        loss = xent_triton.cross_entropy(x, y, **opts)
        leaves = [x]
    else:
        h = torch.randn(N, D, generator=g).requires_grad_()
        W = torch.randn(C, D, generator=g).requires_grad_()
        b = torch.randn(C, generator=g).requires_grad_()
        loss = xent_triton.linear_cross_entropy(h, W, y, linear_bias=b, **opts)
        leaves = [h, W, b]
    (loss * 1.3).backward()
    assert loss.item() == 0.0
    for t in leaves:
        assert torch.equal(t.grad, torch.zeros_like(t)), t.grad


# -------------------------------------- item 18: bias gradient summed over token chunks
@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
def test_linear_bias_gradient_sums_over_token_chunks(dtype, path):
    """chunk_size 4 < N = 13 (4 chunks, the last partial), a bias, upstream gradient 0.7: db
    (and dW, dh) match float64 torch; a bias gradient overwritten per chunk fails here."""
    g = _gen(18)
    N, C, D = 13, 29, 7
    h = torch.randn(N, D, generator=g, dtype=F64)
    W = torch.randn(C, D, generator=g, dtype=F64) / D ** 0.5
    b = torch.randn(C, generator=g, dtype=F64)
    y = torch.randint(0, C, (N,), generator=g)
    y[5] = -100

    def grads(fn, dt, **kw):
        leaves = [t.detach().to(dt).clone().requires_grad_() for t in (h, W, b)]
        (fn(*leaves, **kw) * 0.7).backward()
        return [t.grad for t in leaves]

    ref = grads(lambda h_, W_, b_: F.cross_entropy(F.linear(h_, W_, b_), y), F64)
    theirs = grads(lambda h_, W_, b_: F.cross_entropy(F.linear(h_, W_, b_), y), dtype)
    ours = grads(lambda h_, W_, b_, **kw: xent_triton.linear_cross_entropy(h_, W_, y, linear_bias=b_, **kw),
                 dtype, chunk_size=4)
    for name, o, t, r in zip(("dh", "dW", "db"), ours, theirs, ref):
        assert_close_rule(name, o, t, r, dtype)
