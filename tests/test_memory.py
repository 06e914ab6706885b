"""Peak extra memory of forward + backward, measured by ``traffic.peak_extra_bytes`` (aten allocations
while the step runs, above what was live before).

Budget: the gradient itself (1.0x the logits' bytes) plus O(N) (``PER_ROW`` = 1024 bytes per row for
per-row loss / lse / stats, reduction scalars, the CPU target check), and no float32 N x C buffer;
with ``inplace_backward=True`` the gradient reuses the logits' storage: O(N) only.

``peak_extra_bytes`` sums the profiler's allocation events, so a block allocated inside an earlier
measurement and freed inside this one counts as negative bytes and can hide a real allocation;
``_peak`` therefore collects garbage (earlier tests' cyclic leftovers) before measuring.
"""
import gc
import os

import pytest
import torch

import xent_triton

traffic = pytest.importorskip("traffic")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                reason="peak_extra_bytes measures CPU allocations of the interpreted kernels")

N = 64
PER_ROW = 1024  # bytes per row allowed beyond the gradient: per-row outputs and scalars are O(N)

def _peak(fn) -> int:
    """traffic.peak_extra_bytes(fn) after a gc.collect() (see the module docstring)."""
    gc.collect()
    return traffic.peak_extra_bytes(fn)


CASES = [
    pytest.param(C, inplace, as_view, id=f"C{C}-{'inplace' if inplace else 'grad-copy'}-{'view' if as_view else 'leaf'}")
    for C, inplace, as_view in [(32000, False, False), (32000, True, False), (32000, True, True),
                                (128256, False, True), (128256, True, False)]
]


@pytest.mark.parametrize("C, inplace, as_view", CASES)
def test_peak_memory_of_forward_backward(C, inplace, as_view, record_property):
    """Peak extra bytes of forward + backward on bf16 (N, C) logits: <= 1.0x logits + PER_ROW * N and
    < N*C*4 (no fp32 N x C buffer); with inplace_backward, <= PER_ROW * N and the gradient lands in
    the logits' own storage. The input is a leaf or a ``.view()`` of one (``x * 1`` would make its
    own backward allocate a gradient copy, which is not the loss's doing)."""
    leaf = torch.randn(N, C, dtype=torch.bfloat16, requires_grad=True)
    x = leaf.view(N, C) if as_view else leaf
    y = torch.randint(0, C, (N,))
    y[::7] = -100
    logit_bytes = N * C * 2

    def step() -> None:
        loss = xent_triton.cross_entropy(x, y, label_smoothing=0.1, inplace_backward=inplace)
        loss.backward(torch.tensor(0.5))

    peak = _peak(step)
    record_property("peak_extra_bytes", peak)
    print(f"\npeak extra: {peak} B = {peak / logit_bytes:.6f}x logits "
          f"({(peak - (0 if inplace else logit_bytes)) / N:.2f} B/row beyond the gradient)")
    assert leaf.grad is not None and leaf.grad.shape == (N, C) and leaf.grad.dtype == torch.bfloat16
    assert torch.isfinite(leaf.grad).all()
    if inplace:
        assert leaf.grad.untyped_storage().data_ptr() == leaf.untyped_storage().data_ptr(), \
            "inplace_backward: the gradient should be the logits' storage"
        assert peak <= PER_ROW * N, f"inplace_backward peak {peak} B > O(N) budget {PER_ROW * N} B"
    else:
        assert peak >= logit_bytes, "the gradient's own allocation must show (measurement sanity)"
        assert peak <= logit_bytes + PER_ROW * N, f"peak {peak} B = {peak / logit_bytes:.4f}x logits"
        assert peak < N * C * 4, "an fp32 N x C buffer was allocated"
