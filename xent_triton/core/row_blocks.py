"""Bounded row blocks for the torch paths: logits as (rows, classes) blocks of about ``BLOCK_ELEMS``
elements (temporaries never grow with N), class chunks of ``CHUNK_C`` for the online log-sum-exp,
and the compositions of the formula twins (``core/formulas_torch.py``) over such rows.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import formulas_torch as ft
from .options import LossOptions

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


# ------------------------------------------------------------ compositions of the formula twins
def transformed(z: Tensor, opts: LossOptions) -> Tensor:
    """``transform_logits`` of rows z, or z itself when the transform is the identity."""
    if opts.logit_scale == 1.0 and not opts.has_softcap:
        return z
    return ft.transform_logits(z, opts.logit_scale, opts.softcap)


def smooth_coef(soft: Optional[Tensor], weight: Optional[Tensor], c0: int, c1: int, C: int, eps: float,
                cdt: torch.dtype, device: torch.device) -> Tensor:
    """a_j of classes [c0, c1): w_j t'_j (soft target ``soft`` (N, C, D)) or w_j (hard smoothing),
    shape (R, c) or (1, c)."""
    if soft is not None:
        a = ft.smoothed_target(rows(soft, c0, c1, cdt), eps, C)
    else:
        a = torch.ones(1, c1 - c0, dtype=cdt, device=device)
    if weight is not None:
        a = a * weight[c0:c1].to(cdt)
    return a


def target_gather(x3: Tensor, y_safe: Tensor, cdt: torch.dtype) -> Tensor:
    """x3[n, y, d] per row r = n * D + d of an (N, C, D) tensor, in the compute dtype."""
    N, _, D = x3.shape
    return x3.gather(1, y_safe.view(N, 1, D)).reshape(-1).to(cdt)


def softmax_entropy_argmax(z: Tensor, argmax: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """(entropy of softmax(z), first argmax or None) of rows z (rows, C), by the kernels' own
    formulas (``online_lse_update``, ``entropy_argmax_update``, ``entropy_from_sums``) over the
    row as one block. Differentiable in z (the entropy)."""
    lead = z.shape[:-1]
    m0 = torch.full(lead, float("-inf"), dtype=z.dtype, device=z.device)
    zero = torch.zeros(lead, dtype=z.dtype, device=z.device)
    m, s, ref_old, ref_new = ft.online_lse_update(m0, zero, z)
    cols = torch.arange(z.shape[-1], device=z.device)
    idx = torch.zeros(lead, dtype=torch.int64, device=z.device)
    e, _, idx = ft.entropy_argmax_update(zero, m0, idx, zero, z, cols, ref_old, ref_new)
    return ft.entropy_from_sums(torch.log(s), e, s), idx if argmax else None
