"""Device and dtype policy shared by every op: who runs a tensor (Triton or the torch fallback),
the compute dtype, output allocation, and the ``torch.compile`` probe.

The bottom layer of the package: it imports nothing from it.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Tests set this so that every output buffer starts as NaN and an unwritten element fails.
POISON_ENV = "XENT_POISON_OUTPUTS"


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def poison_outputs() -> bool:
    return os.environ.get(POISON_ENV, "0") == "1"


def uses_triton(x: Tensor) -> bool:
    """True when the Triton kernels (not the torch fallback) serve this tensor."""
    return x.dtype in TRITON_DTYPES and (x.is_cuda or interpreting())


def compute_dtype(x: Tensor) -> torch.dtype:
    """Per-row statistics and accumulators: float64 for float64 inputs, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def alloc(shape, dtype: torch.dtype, device) -> Tensor:
    """An output buffer (NaN-filled when outputs are poisoned, so unwritten elements fail tests)."""
    if poison_outputs():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def upstream_or_zeros(grad: Optional[Tensor], rows: int, dtype: torch.dtype, device) -> Tensor:
    """The upstream gradient of a per-row output, or a (rows,) zero view when autograd gave None."""
    if grad is not None:
        return grad
    return torch.zeros((), dtype=dtype, device=device).expand(rows)


def is_compiling() -> bool:
    """True while dynamo traces (torch.compile)."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


class _NoSecondDerivative(torch.autograd.Function):
    """Identity whose backward raises: marks a first derivative that is not differentiable."""

    @staticmethod
    def forward(ctx, t: Tensor, what: str, anchor: Optional[Tensor] = None) -> Tensor:
        ctx.what = what
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            f"xent_triton.{ctx.what}: second derivatives are not implemented (a backward with "
            "create_graph=True was differentiated again: Hessian-vector products, gradient penalties, "
            "gradgradcheck). Use the torch composition (F.cross_entropy) for those.")


def no_second_derivative(t: Optional[Tensor], what: str, anchor: Optional[Tensor] = None) -> Optional[Tensor]:
    """Inside a backward that records a graph (create_graph=True), tie ``t`` to a node that raises
    if it is ever differentiated; otherwise return ``t`` unchanged. ``anchor``: a tensor connected
    to the op's inputs (e.g. a saved output of the op) when ``t`` itself was formed without them (a
    gradient computed in forward): the raising node then lies on every path back to the inputs."""
    if t is None or not torch.is_grad_enabled():
        return t
    if anchor is not None and anchor.requires_grad:
        return _NoSecondDerivative.apply(t.detach(), what, anchor)
    if not t.requires_grad:
        t = t.detach().requires_grad_(True)  # so that the raising node is part of the graph
    return _NoSecondDerivative.apply(t, what)
