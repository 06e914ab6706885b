"""Memory and FLOPs of the fused linear cross-entropy, measured on the interpreted kernels with the
traffic tool (../shared/tools/traffic.py).

FLOPs (tl.dot tile shapes + aten matmuls) of forward + backward: exactly 8·N·D·C = 4.0 × the
2·N·D·C of the logits GEMM when N, D, C are multiples of the tiles (forward logits 2, backward
recompute 2 + dX 2 + dW 2); padded tiles count in full otherwise. Memory: the extra peak grows with
the gradient buffers (fp32 accumulator + final-dtype copy of dX (N·D) and dW (C·D), db (C)) and
O(N), never with N·C.
"""
import gc
import os

import pytest
import torch

import xent_triton
from xent_triton import launch

traffic = pytest.importorskip("traffic")
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
        loss = out[0] + 0.1 * out[1].sum() if isinstance(out, tuple) else out
        if loss.requires_grad:
            loss.backward(torch.tensor(0.5))
        for t in (x, w, b):
            t.grad = None
    return step


def _padded(n: int, block: int) -> int:
    return -(-n // block) * block


FLOP_CASES = [  # (N, D, C, need, kwargs, expected count as a function of padded (N, D, C))
    pytest.param(128, 64, 4096, (True, True, True), {}, lambda n, d, c: 8 * n * d * c, id="aligned-all-grads"),
    pytest.param(128, 64, 4096, (True, True, True), dict(label_smoothing=0.1, softcap=9.0, return_lse=True),
                 lambda n, d, c: 8 * n * d * c, id="aligned-all-options"),
    pytest.param(128, 64, 4096, (True, False, False), {}, lambda n, d, c: 6 * n * d * c, id="aligned-input-grad-only"),
    pytest.param(128, 64, 4096, (False, True, True), {}, lambda n, d, c: 6 * n * d * c, id="aligned-weight-grads-only"),
    pytest.param(100, 123, 1000, (True, True, True), {}, lambda n, d, c: 8 * n * d * c, id="unaligned-padded"),
]


@pytest.mark.parametrize("N,D,C,need,kw,expected", FLOP_CASES)
def test_dot_flops(N, D, C, need, kw, expected, record_property):
    """tl.dot FLOPs of forward + backward equal the design's count on tile-padded sizes (exactly
    8·N·D·C = 4.0x 2·N·D·C when aligned); no aten matmul; every lane in bounds; 2 launches."""
    cfg, _ = launch.linear_configs(16, True, C)
    step = _step(N, D, C, need=need, **kw)
    with traffic.count() as r:
        step()
    n, d, c = _padded(N, cfg.block_n), _padded(D, cfg.block_d), _padded(C, cfg.block_v)
    record_property("flops", r["flops"])
    print(f"\nflops {r['flops']} = {r['flops'] / (2 * N * D * C):.4f} x 2NDC "
          f"({r['flops'] / (6 * N * D * C):.4f} x 6NDC), padding {n * d * c / (N * D * C):.3f}")
    assert r["flops"] == expected(n, d, c)
    assert "mm" not in r["ops"] and "addmm" not in r["ops"]
    assert r["oob"] == []
    assert r["launches"] == 2


def test_all_ignored_skips_every_tile():
    """Every row ignored: forward and backward skip all their tiles (uniform branch, no host sync)."""
    step = _step(128, 64, 4096, ignore_all=True)
    with traffic.count() as r:
        step()
    assert r["flops"] == 0 and r["oob"] == []


def _peak(step) -> int:
    gc.collect()  # earlier garbage freed inside the window would count as negative bytes
    return traffic.peak_extra_bytes(step)


def test_peak_memory_grows_with_gradients_not_logits(record_property):
    """Peak extra bytes at (N, C), (2N, C), (N, 2C), bf16: growth is the gradient buffers only
    (dX: 4 + 2 bytes per N·D element, dW: 4 + 2 per C·D, db: 4 + 2 per class) plus O(N). Any
    N x C buffer fails the bounds: bf16 logits would add N·C·2 = 2 MiB to each growth, the bounds
    allow 65 KiB (2N) and 805 KiB (2C)."""
    N, D, C = 256, 32, 4096
    _peak(_step(32, D, 256))  # warm-up: lazy initialisations outside the measurements
    base, peak_2n, peak_2c = (_peak(_step(n, D, c)) for n, c in ((N, C), (2 * N, C), (N, 2 * C)))
    record_property("peaks", (base, peak_2n, peak_2c))
    grads = lambda n, c: 6 * (n * D + c * D + c)  # noqa: E731
    per_row = 64  # loss, lse, 3 stats, 5 partials x 2 splits, targets: O(N)
    print(f"\npeak extra bytes: (N, C) {base}, (2N, C) {peak_2n}, (N, 2C) {peak_2c}; "
          f"gradients {grads(N, C)}, logits would be {N * C * 2}")
    assert grads(N, C) <= base <= grads(N, C) + per_row * N
    assert 0 <= peak_2n - base <= grads(2 * N, C) - grads(N, C) + per_row * N
    assert 0 <= peak_2c - base <= grads(N, 2 * C) - grads(N, C) + per_row * N
