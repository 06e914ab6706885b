"""Memory and FLOPs of the fused linear cross-entropy, measured with the in-repo traffic harness
(tests/harness/traffic.py: aten mm / addmm FLOPs and interpreted tl.dot tiles).

FLOPs of forward + backward: the token-chunked default (reduction mean / sum) does exactly
6·N·D·C = 3.0 × the 2·N·D·C of the logits GEMM, all of it in aten GEMMs (logits, dX, dW); a
per-token upstream gradient (reduction none, return_lse) does 8·N·D·C = 4.0 ×: the fused
partials kernel (tl.dot, padded tiles count in full) + the recompute backward's three GEMMs.
Memory: the extra peak grows with the gradient buffers, the chunk workspace and O(N), never N·C.
"""
import gc
import os

import pytest
import torch

import xent_triton
from harness import traffic
from xent_triton import config

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                reason="the traffic tool measures interpreted kernels on the CPU")
BF16 = torch.bfloat16


def _step(N, D, C, *, need=(True, True, True), ignore_all=False, dtype=BF16, **kw):
    """A closure running forward + backward (grads dropped afterwards, so repeated calls match)."""
    x = torch.randn(N, D).to(dtype).requires_grad_(need[0])
    w = (torch.randn(C, D) / D ** 0.5).to(dtype).requires_grad_(need[1])
    b = (torch.randn(C) * 0.1).to(dtype).requires_grad_(need[2])
    y = torch.randint(0, C, (N,))
    y[::5] = -100
    if ignore_all:
        y[:] = -100

    def step():
        out = xent_triton.linear_cross_entropy(x, w, y, linear_bias=b, **kw)
        loss = out[0].sum() + 0.1 * out[1].sum() if isinstance(out, tuple) else out.sum()
        if loss.requires_grad:
            loss.backward(torch.tensor(0.5))
        for t in (x, w, b):
            t.grad = None
    return step


def _padded(n: int, block: int) -> int:
    return -(-n // block) * block


FLOP_CASES = [  # (N, D, C, need, kwargs, expected aten FLOPs, expected tl.dot FLOPs on padded sizes)
    pytest.param(128, 64, 4096, (True, True, True), {}, 6, None, id="mean-all-grads"),
    pytest.param(100, 123, 1000, (True, True, True), dict(chunk_size=16), 6, None,
                 id="mean-unaligned-chunks"),
    pytest.param(128, 64, 4096, (True, True, True),
                 dict(reduction="sum", label_smoothing=0.1, softcap=9.0, lse_square_scale=1e-3), 6, None,
                 id="sum-all-options"),
    pytest.param(128, 64, 4096, (True, False, False), {}, 4, None, id="mean-input-grad-only"),
    pytest.param(128, 64, 4096, (False, True, True), {}, 4, None, id="mean-weight-grads-only"),
    pytest.param(128, 64, 4096, (True, True, True), dict(return_lse=True, label_smoothing=0.1), 6, 2,
                 id="per-token-lse"),
    pytest.param(100, 123, 1000, (True, True, True), dict(reduction="none"), 6, 2,
                 id="per-token-none-unaligned"),
]


@pytest.mark.parametrize("N,D,C,need,kw,aten,dot", FLOP_CASES)
def test_flops(N, D, C, need, kw, aten, dot, record_property):
    """aten GEMM FLOPs = aten x N·D·C exactly; tl.dot FLOPs (fused partials forward of the
    per-token path) = dot x the tile-padded N·D·C; nothing else; every lane in bounds."""
    cfg, _ = config.linear_configs(16, True, C)
    step = _step(N, D, C, need=need, **kw)
    with traffic.count() as r:
        step()
    with traffic.count() as f:
        _step(N, D, C, need=(False, False, False), **kw)()
    total = r["flops"]
    tl_dot = f["flops"] if dot else 0
    n, d, c = _padded(N, cfg.block_n), _padded(D, cfg.block_d), _padded(C, cfg.block_v)
    record_property("flops", total)
    print(f"\nflops {total} = {total / (2 * N * D * C):.4f} x 2NDC; tl.dot share {tl_dot / total:.3f}")
    assert total - tl_dot == aten * N * D * C
    assert tl_dot == (dot * n * d * c if dot else 0)
    assert r["oob"] == []


def test_all_ignored_tokens():
    """Every row ignored: the per-token forward skips all its tiles; the gradients are zero."""
    with traffic.count() as r:
        _step(128, 64, 4096, need=(False, False, False), ignore_all=True, reduction="none")()
    assert r["flops"] == 0 and r["oob"] == []


def _peak(step) -> int:
    gc.collect()  # earlier garbage freed inside the window would count as negative bytes
    return traffic.peak_extra_bytes(step)


def test_peak_memory_grows_with_gradients_not_logits(record_property):
    """Peak extra bytes at (N, C), (2N, C), (N, 2C), bf16, chunk_size=32: growth is the gradient
    buffers (dX: 2 + 2 bytes per N·D element (unscaled + final), dW: 4 + 2 + 2 per C·D (fp32
    accumulator, final, the CPU's 16-bit product scratch), db: 4 + 2 per class), the CPU's fp32
    operand copies for the fp32 logits GEMM (4 per N·D and C·D, 4 per class), the workspace's own
    growth at 2C (32·C·(4 + 2) bytes, + 32·C·2 for the interpreter's host copy of the 16-bit dZ
    argument: an artifact of the CPU run) and O(N). Any N x C buffer fails the bounds."""
    N, D, C, chunk = 256, 32, 4096, 32
    _peak(_step(32, D, 256, chunk_size=chunk))  # warm-up
    shapes = ((N, C), (2 * N, C), (N, 2 * C))
    base, peak_2n, peak_2c = (_peak(_step(n, D, c, chunk_size=chunk)) for n, c in shapes)
    record_property("peaks", (base, peak_2n, peak_2c))
    grads = lambda n, c: 8 * n * D + 12 * c * D + 14 * c  # noqa: E731
    per_row = 96
    print(f"\npeak extra bytes: (N, C) {base}, (2N, C) {peak_2n}, (N, 2C) {peak_2c}; "
          f"gradients {grads(N, C)}, logits would be {N * C * 2}")
    assert base <= grads(N, C) + chunk * C * 8 + per_row * N
    assert 0 <= peak_2n - base <= grads(2 * N, C) - grads(N, C) + per_row * N
    assert 0 <= peak_2c - base <= grads(N, 2 * C) - grads(N, C) + chunk * C * 8 + per_row * N
