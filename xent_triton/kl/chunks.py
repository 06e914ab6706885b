"""Token chunks of the KL family's linear forms (``kl/linear.py``, and its vocabulary-parallel
twin ``kl/parallel_linear.py``): the chunk size rule, the hidden states' rows and the student's
gradient buffers filled chunk by chunk.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..linear.chunked import accumulate_mm, make_scratch
from ..runtime import compute_dtype

CHUNK_LOGITS = 1 << 24  # default chunk: about 16M logits per model buffer


def chunk_rows(chunk_size: Optional[int], N: int, C: int) -> int:
    if chunk_size is None:
        return max(1, min(N, CHUNK_LOGITS // max(C, 1)))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


class Grads:
    """The student's gradient buffers, allocated only for what autograd asks (a frozen head
    - LoRA, RL with a fixed head - allocates no (C, D) or (C,) buffer): dX in x's dtype, dW and
    db as fp32 / fp64 accumulators (``scratch`` from ``make_scratch``)."""

    def __init__(self, x: Tensor, w: Tensor, need_dx: bool, need_dw: bool, need_db: bool):
        acc = compute_dtype(x)
        self.x_dtype, self.w_dtype = x.dtype, w.dtype
        self.dx = x.new_empty(x.shape) if need_dx else None
        self.dw = torch.zeros(w.shape, dtype=acc, device=x.device) if need_dw else None
        self.db = torch.zeros((w.shape[0],), dtype=acc, device=x.device) if need_db else None
        self.scratch = make_scratch(self.dw, x.dtype)

    def add_chunk(self, dz: Tensor, x: Tensor, w: Tensor, r0: int, r1: int) -> None:
        """dX rows = dZ W (written), dW += dZᵀ X, db += sum dZ (16-bit products reach dW as in the
        linear head: ``out_dtype`` GEMMs on CUDA, a block scratch on CPU)."""
        if self.dx is not None:
            torch.mm(dz, w, out=self.dx[r0:r1])
        if self.dw is not None:
            accumulate_mm(self.dw, dz.t(), x[r0:r1], False, self.scratch)
        if self.db is not None:
            self.db.add_(dz.sum(0, dtype=self.db.dtype))

    def result(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(dX, dW, db) with a (0,) placeholder for each one not asked for."""
        return (x.new_empty((0,)) if self.dx is None else self.dx,
                x.new_empty((0,)) if self.dw is None else self.dw.to(self.w_dtype),
                x.new_empty((0,)) if self.db is None else self.db.to(self.w_dtype))


def rows(h: Tensor) -> Tensor:
    """(N, D) rows of (..., D) hidden states (D = 0 too, where -1 would be ambiguous)."""
    return h.reshape(h.shape[:-1].numel(), h.shape[-1])
