"""Torch twins of ``linear/chunk_kernels.py``: the linear head's chunk step where Triton cannot run
(CPU tensors without ``TRITON_INTERPRET=1``, float64 on any device).

A chunk of logits (any float dtype: 16-bit on the plain-CPU path, where the logits GEMM runs in
the operands' dtype as torch eager's does) is walked in row blocks of about
``row_blocks.BLOCK_ELEMS`` logits: each block is upcast once into one reused compute-dtype buffer
(cache-sized: every following pass hits cache, not DRAM), turned into dL/dz with torch's
vectorised ops (max, exp, sum, scatter) and written back into ``dz``.

Rows that carry no gradient (ignored targets, no lse gradient) get all-zero coefficients, so
their gradient is 0 x p = 0 with no masking pass; a skipped row of the recompute path is shifted
by +inf (exp -> 0) because its saved stats are not those of its logits.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.formulas_torch import (
    entropy_from_sums,
    finish_hard_rows,
    hard_target_coefficients,
    hard_target_loss,
    safe_ref,
    transform_grad,
    weight_total,
)
from ..core.options import LossOptions
from ..core.row_blocks import BLOCK_ELEMS, transformed
from ..core.runtime import compute_dtype


def row_blocks(z: Tensor):
    """(row slice, compute-dtype view of those rows) over ``z`` (rows, C): ``z`` itself when it is
    in the compute dtype (written in place), else an upcast copy in one reused buffer."""
    rows, C = z.shape
    step = max(1, BLOCK_ELEMS // max(1, C))
    cdt = compute_dtype(z)
    buf = None if z.dtype == cdt else torch.empty(min(rows, step) * C, dtype=cdt, device=z.device)
    for s0 in range(0, rows, step):
        s = slice(s0, min(rows, s0 + step))
        yield s, z[s] if buf is None else buf[:(s.stop - s0) * C].view(-1, C).copy_(z[s])


def finish_grad(e: Tensor, t: Tensor, out: Tensor, y_idx: Tensor, coef_y: Tensor, coef_u: Tensor,
                weight: Optional[Tensor], opts: LossOptions) -> None:
    """e (= coef_p p) -> dL/dx in place, then into ``out`` (when they differ)."""
    e.scatter_add_(1, y_idx[:, None], -coef_y[:, None].to(e.dtype))
    if opts.has_smoothing:
        if weight is not None:
            e.addr_(coef_u.to(e.dtype), weight.to(e.dtype), alpha=-1)
        else:
            e.sub_(coef_u[:, None].to(e.dtype))
    transform_grad(e, t, opts.logit_scale, opts.softcap, inplace=True)  # t: overwritten
    if e is not out:
        out.copy_(e)


def loss_grad_torch(z: Tensor, dz: Tensor, target: Tensor, weight: Optional[Tensor], wsum: Optional[Tensor],
                    zcoef: Optional[Tensor], opts: LossOptions, loss: Tensor, lse: Tensor, stats: Tensor,
                    tw: Optional[Tensor] = None, ent: Optional[Tensor] = None,
                    pred: Optional[Tensor] = None) -> None:
    """Twin of ``chunk_loss_grad_kernel`` (same outputs) over the (rows, C) chunk ``z``."""
    for s, work in row_blocks(z):
        loss_grad_block(work, dz[s], target[s], weight, wsum, zcoef, opts, loss[s], lse[s], stats[s],
                        *(t[s] if t is not None else None for t in (tw, ent, pred)))


def loss_grad_block(work, dz, target, weight, wsum, zcoef, opts: LossOptions, loss, lse, stats, tw, ent,
                    pred) -> None:
    """One row block of ``loss_grad_torch``; ``work`` (compute dtype) is overwritten."""
    C = work.shape[1]
    eps = opts.label_smoothing
    t = transformed(work, opts)
    valid = target != opts.ignore_index
    ok = valid & (target >= 0) & (target < C)
    y_safe = torch.where(ok, target, torch.zeros_like(target))
    ref = safe_ref(t.amax(1))
    z_y = t.gather(1, y_safe[:, None]).squeeze(1)
    w_y = weight.to(t.dtype)[y_safe] if weight is not None else torch.ones_like(z_y)
    d = torch.sub(t, ref[:, None], out=work) if t is not work else work.sub_(ref[:, None])
    w_total = weight_total(wsum.to(t.dtype) if wsum is not None else None, C)
    if eps > 0:
        acc = d @ weight.to(d.dtype) if weight is not None else d.sum(1)
    if pred is not None:
        pred.copy_(d.argmax(1))
    e = d.exp_()
    s = e.sum(1)
    log_s = torch.log(s)
    if ent is not None:  # E = sum_j e^{d_j} d_j (xlogy: 0 where e underflows)
        ent.copy_(entropy_from_sums(log_s, torch.xlogy(e, e).sum(1), s))
    smooth = w_total * log_s - acc if eps > 0 else None
    row_loss = hard_target_loss((ref - z_y) + log_s, smooth, w_y, eps, C)
    row_loss, row_w = finish_hard_rows(row_loss, w_y, target, opts.ignore_index, C)
    row_lse = torch.where(valid, ref + log_s, torch.zeros_like(ref))
    loss.copy_(row_loss)
    lse.copy_(row_lse)
    stats.copy_(torch.stack([ref, log_s, row_w], dim=1))
    g = tw.to(row_lse.dtype) if tw is not None else torch.ones_like(row_lse)
    h = torch.where(valid, zcoef * g * row_lse, torch.zeros_like(row_lse)) if zcoef is not None else \
        torch.zeros_like(row_lse)
    coef_p, coef_y, coef_u = hard_target_coefficients(g, h, row_w, valid, eps, C, w_total)
    e.mul_((coef_p / s)[:, None])
    finish_grad(e, t, dz, y_safe, coef_y, coef_u, weight, opts)


def grad_torch(z: Tensor, dz: Tensor, target: Tensor, weight: Optional[Tensor], wsum: Optional[Tensor],
               stats: Tensor, dloss: Tensor, dlse: Optional[Tensor], opts: LossOptions, class_offset: int,
               n_classes: int) -> None:
    """Twin of ``chunk_grad_kernel`` over the (N, C_s) vocabulary split ``z``."""
    for s, work in row_blocks(z):
        grad_block(work, dz[s], target[s], weight, wsum, stats[s], dloss[s],
                   dlse[s] if dlse is not None else None, opts, class_offset, n_classes)


def grad_block(work, dz, target, weight, wsum, stats, dloss, dlse, opts: LossOptions, class_offset: int,
               n_classes: int) -> None:
    """One row block of ``grad_torch``; ``work`` (compute dtype) is overwritten."""
    C = work.shape[1]
    t = transformed(work, opts)
    ref, log_s, row_w = (stats[:, i].to(t.dtype) for i in range(3))
    log_s = torch.where(log_s == float("-inf"), torch.zeros_like(log_s), log_s)  # skipped ignored rows
    g = dloss.to(t.dtype)
    h = dlse.to(t.dtype) if dlse is not None else torch.zeros_like(g)
    valid = target != opts.ignore_index
    w_total = weight_total(wsum.to(t.dtype) if wsum is not None else None, n_classes)
    coef_p, coef_y, coef_u = hard_target_coefficients(g, h, row_w, valid, opts.label_smoothing, n_classes,
                                                      w_total)
    active = valid | (dlse is not None)
    shift = torch.where(active, ref + log_s, torch.full_like(ref, float("inf")))
    y_local = target - class_offset
    here = (y_local >= 0) & (y_local < C)
    y_idx = torch.where(here, y_local, torch.zeros_like(y_local))
    coef_y = torch.where(here, coef_y, torch.zeros_like(coef_y))
    d = torch.sub(t, shift[:, None], out=work) if t is not work else work.sub_(shift[:, None])
    e = d.exp_().mul_(coef_p[:, None])
    finish_grad(e, t, dz, y_idx, coef_y, coef_u, weight, opts)


def partials_torch(z: Tensor, y_local: Tensor, weight: Optional[Tensor], opts: LossOptions,
                   part: Tensor) -> None:
    """Twin of ``linear_xent_fwd_kernel``'s partials for one split holding all of ``z``'s classes:
    ``part`` (rows, 5) <- (m, s, A, a_sum, z_y) of the transformed (rows, C) logits ``z``, with
    s = sum_j exp(t_j - m), A = sum_j a_j (t_j - m) (m = 0 where the row is all -inf), a_j = w_j or 1,
    z_y = t at ``y_local`` (0 where that is outside [0, C))."""
    C = z.shape[1]
    for s, work in row_blocks(z):
        t = transformed(work, opts)
        m = t.amax(1)
        ref = safe_ref(m)
        y = y_local[s]
        here = (y >= 0) & (y < C)
        z_y = t.gather(1, torch.where(here, y, torch.zeros_like(y))[:, None]).squeeze(1)
        d = torch.sub(t, ref[:, None], out=work) if t is not work else work.sub_(ref[:, None])
        out = part[s]
        if opts.has_smoothing:
            a = weight.to(d.dtype) if weight is not None else None
            out[:, 2] = d @ a if a is not None else d.sum(1)
            out[:, 3] = a.sum() if a is not None else C
        else:
            out[:, 2:4] = 0
        out[:, 0] = m
        out[:, 1] = d.exp_().sum(1)
        out[:, 4] = torch.where(here, z_y, torch.zeros_like(z_y))
