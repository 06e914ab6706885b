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
from harness import traffic

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                reason="peak_extra_bytes measures CPU allocations of the interpreted kernels")

N = 64
PER_ROW = 1024  # bytes per row allowed beyond the gradient: per-row outputs and scalars are O(N)

class _Source(torch.autograd.Function):
    """Non-leaf logits (a view of ``data``) whose backward passes on one element of the gradient."""

    @staticmethod
    def forward(ctx, p, data):
        return data.view_as(data)

    @staticmethod
    def backward(ctx, g):
        return g.reshape(-1)[:1].float(), None  # O(1): a reduction could upcast all of g


def _peak(fn) -> int:
    """traffic.peak_extra_bytes(fn) after a gc.collect() (see the module docstring)."""
    gc.collect()
    return traffic.peak_extra_bytes(fn)


CASES = [
    pytest.param(C, inplace, source, id=f"C{C}-{'inplace' if inplace else 'grad-copy'}-{source}")
    for C, inplace, source in [(32000, False, "leaf"), (32000, True, "source"), (32000, False, "view"),
                               (128256, False, "view"), (128256, True, "source")]
]


@pytest.mark.parametrize("C, inplace, source", CASES)
def test_peak_memory_of_forward_backward(C, inplace, source, record_property):
    """Peak extra bytes of forward + backward on bf16 (N, C) logits: <= 1.0x logits + PER_ROW * N and
    < N*C*4 (no fp32 N x C buffer); with inplace_backward, <= PER_ROW * N and the gradient lands in
    the logits' own storage. The input is a leaf or a ``.view()`` of one; for inplace_backward
    (refused for leaf logits) the non-leaf output of ``_Source``, formed before the measured step,
    whose own backward adds O(1) bytes."""
    if source == "source":
        leaf = torch.ones(1, requires_grad=True)
        x = _Source.apply(leaf, torch.randn(N, C, dtype=torch.bfloat16))
        seen = {}
        x.register_hook(lambda g: seen.update(ptr=g.untyped_storage().data_ptr()))
    else:
        leaf = torch.randn(N, C, dtype=torch.bfloat16, requires_grad=True)
        x = leaf.view(N, C) if source == "view" else leaf
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
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    if inplace:
        assert seen["ptr"] == x.untyped_storage().data_ptr(), \
            "inplace_backward: the gradient should be the logits' storage"
        assert peak <= PER_ROW * N, f"inplace_backward peak {peak} B > O(N) budget {PER_ROW * N} B"
    else:
        assert peak >= logit_bytes, "the gradient's own allocation must show (measurement sanity)"
        assert peak <= logit_bytes + PER_ROW * N, f"peak {peak} B = {peak / logit_bytes:.4f}x logits"
        assert peak < N * C * 4, "an fp32 N x C buffer was allocated"
