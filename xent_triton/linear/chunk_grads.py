"""A linear head's weight and input gradients from chunks of dZ, on vendor GEMMs: ``accumulate_mm``
(a product written or added in the accumulator's dtype: fp32 accumulation of 16-bit products by
``out_dtype`` GEMMs on CUDA, a cache-sized scratch per block of rows on CPU, fp32 GEMMs on upcast
blocks on a CPU without AMX) and ``ChunkGrads`` (dX, dW, db over token chunks), shared by the
token-chunked CE head (``chunked.py``) and the KL family's linear forms (``kl/linear_ops.py``,
``kl/linear_scalar.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.runtime import alloc
from .cpu_gemm import mm_fp32, upcast_gemm

CPU_SCRATCH_ELEMS = 1 << 20  # a 16-bit product block of accumulate_mm on CPU (2 MiB; its fp32 upcast 4)
HAS_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out") and hasattr(torch.ops.aten.mm, "dtype")


def accumulate_mm(acc: Tensor, a: Tensor, bmat: Tensor, first: bool,
                  scratch: Optional[Tensor]) -> None:
    """acc (=|+=) a @ bmat in acc's dtype (``chunked.py``'s module docstring: the 16-bit -> fp32 case;
    there, blocks of ``scratch.shape[0]`` rows of acc, one GEMM each). Plain-CPU 16-bit operands
    without a fast 16-bit GEMM: fp32 GEMMs on upcast blocks (``cpu_gemm.mm_fp32``)."""
    if upcast_gemm(a) and acc.dtype in (a.dtype, torch.float32):
        mm_fp32(acc, a, bmat, accumulate=not first)
        return
    if acc.dtype == a.dtype:
        if first:
            torch.mm(a, bmat, out=acc)
        else:
            acc.addmm_(a, bmat)
    elif acc.is_cuda and HAS_OUT_DTYPE:
        if first:
            torch.mm(a, bmat, out_dtype=acc.dtype, out=acc)
        else:
            torch.addmm(acc, a, bmat, out_dtype=acc.dtype, out=acc)
    else:
        step = scratch.shape[0]
        for r0 in range(0, acc.shape[0], step):
            r1 = min(acc.shape[0], r0 + step)
            part = torch.mm(a[r0:r1], bmat, out=scratch[:r1 - r0])
            acc[r0:r1].copy_(part) if first else acc[r0:r1].add_(part)


def make_scratch(acc: Optional[Tensor], operand_dtype: torch.dtype) -> Optional[Tensor]:
    """The operands'-dtype product buffer of ``accumulate_mm`` where the GEMM cannot output fp32:
    all of acc's shape on CUDA, cache-sized row blocks on CPU (a mixed-dtype add there upcasts
    its operand into a temporary of the same size: with the whole (C, D) that is C D 4 bytes)."""
    if acc is None or acc.dtype == operand_dtype or (acc.is_cuda and HAS_OUT_DTYPE):
        return None
    rows, cols = acc.shape
    if not acc.is_cuda:
        rows = min(rows, max(16, CPU_SCRATCH_ELEMS // max(1, cols)))
    return torch.empty((rows, cols), dtype=operand_dtype, device=acc.device)


class ChunkGrads:
    """A head's gradients formed token chunk by token chunk from each chunk's dZ, allocated only for
    what is needed (a frozen head allocates no (C, D) buffer): dX rows written per chunk in x's
    dtype; dW = sum dZᵀ X in ``acc`` (the first chunk writes: one chunk is ONE GEMM, no accumulator
    when ``acc`` is w's dtype); db = sum dZ in ``db_dtype``. ``done``: dW rounded once into w's dtype,
    dW / db zero when no chunk ran."""

    def __init__(self, x: Tensor, w: Tensor, need: tuple[bool, bool, bool], acc: torch.dtype,
                 db_dtype: torch.dtype):
        self.dx = alloc(tuple(x.shape), x.dtype, x.device) if need[0] else None
        self.dw = alloc(tuple(w.shape), acc, x.device) if need[1] else None
        self.db = alloc((w.shape[0],), db_dtype, x.device) if need[2] else None
        self.scratch, self.first = make_scratch(self.dw, x.dtype), True

    def add(self, dz: Tensor, x: Tensor, w: Tensor, r0: int, r1: int) -> None:
        """dX[r0:r1] = dZ W; dW (+)= dZᵀ X[r0:r1]; db (+)= sum dZ (``accumulate_mm``)."""
        if self.dx is not None:
            accumulate_mm(self.dx[r0:r1], dz, w, True, None)
        if self.dw is not None:
            accumulate_mm(self.dw, dz.t(), x[r0:r1], self.first, self.scratch)
        if self.db is not None:
            part = dz.sum(0, dtype=self.db.dtype)
            self.db.copy_(part) if self.first else self.db.add_(part)
        self.first = False

    def done(self, w: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        self.scratch = None
        if self.first:
            for t in (self.dw, self.db):
                if t is not None:
                    t.zero_()
        dw = self.dw
        if dw is not None and dw.dtype != w.dtype:
            dw = torch.empty(tuple(w.shape), dtype=w.dtype, device=dw.device).copy_(dw)
        return self.dx, dw, self.db
