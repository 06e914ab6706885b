"""Bounded row blocks for the torch paths: logits as (rows, classes) blocks of about ``BLOCK_ELEMS``
elements (temporaries never grow with N), class chunks of ``CHUNK_C`` for the online log-sum-exp.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

CHUNK_C = 8192


BLOCK_ELEMS = 1 << 21  # logits per row block (8 MiB of fp32 temporaries; few, large ops)


def rows(x3: Tensor, c0: int, c1: int, cdt: torch.dtype) -> Tensor:
    """Columns [c0, c1) of an (N, C, D) tensor as (N*D, c1-c0) in the compute dtype."""
    return x3[:, c0:c1, :].permute(0, 2, 1).reshape(-1, c1 - c0).to(cdt)


# ------------------------------------------------------------------------ row-block drivers
def block_samples(C: int, D: int) -> int:
    """Samples (of D rows each) per block: about BLOCK_ELEMS logits, at least one."""
    return max(1, BLOCK_ELEMS // max(1, C * D))


def block_rows(xb: Tensor, cdt: torch.dtype, buf: Optional[Tensor] = None) -> Tensor:
    """An (n, C, D) block as (n*D, C) rows in the compute dtype: a view for D = 1 in that dtype,
    else a copy (into ``buf``, a flat compute-dtype buffer reused across blocks, when given)."""
    n, C, D = xb.shape
    r = xb[:, :, 0] if D == 1 else xb.permute(0, 2, 1)
    if r.dtype == cdt and D == 1:
        return r
    if buf is None:
        return r.reshape(-1, C).to(cdt)
    out = buf[:n * D * C].view(n, D, C) if D != 1 else buf[:n * C].view(n, C)
    return out.copy_(r).view(-1, C)


def row_buffer(x3: Tensor, step: int, cdt: torch.dtype) -> Tensor:
    """One flat compute-dtype buffer for ``step`` samples of x3, allocated once per call: a fresh
    multi-MiB allocation per block would go through mmap and fault its pages in every time."""
    return torch.empty(min(step, x3.shape[0]) * x3.shape[1] * x3.shape[2], dtype=cdt, device=x3.device)
