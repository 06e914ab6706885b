"""Per-row partial statistics of disjoint class ranges, and their one combination.

Layout: ``part`` (S, R, 5) in the compute dtype, for S disjoint class ranges (the class splits of
the fused linear head, or one vocabulary shard) of R rows; per row and range::

    m     = max_j z_j                        (-inf when every logit of the range is -inf)
    s     = sum_j exp(z_j - ref)             ref = safe_ref(m) (0 when m = -inf)
    A     = sum_j a_j (z_j - ref)            (smoothing / soft targets only, else 0)
    a_sum = sum_j a_j                        a_j = w_j t'_j (soft) or w_j (hard smoothing)
    z_y   = z at the row's target if the range holds it, else 0 (hard targets)

``chunked_partials`` forms them with torch ops (the CPU path of a shard, of a soft target, by the
kernels' online log-sum-exp over class chunks). ``combine(part, ..., group=None)`` merges the ranges
of this process and, with a process group, the vocabulary shards of every rank (two all-reduces of
O(R) data: MAX of m, SUM of the rescaled sums), then applies the loss formulas
(``hard_target_loss``, ``finish_hard_rows``: the twins of the kernels' helpers). Sums are taken
relative to the global maximum, so no lse ~ 1e4 is formed and then subtracted.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import row_blocks
from .formulas_torch import (
    finish_hard_rows,
    hard_target_loss,
    online_lse_update,
    safe_ref,
    transform_logits,
    weight_total,
    weighted_sum_update,
)
from .options import LossOptions
from .runtime import compute_dtype

M, S, A, ASUM, ZY = range(5)
N_PARTIALS = 5


def chunked_partials(x3: Tensor, tgt: Tensor, w: Optional[Tensor], n_classes: int,
                     opts: LossOptions) -> Tensor:
    """(1, R, 5) partials of the (N, C, D) logits ``x3`` by torch ops over CHUNK_C-class chunks
    (the online log-sum-exp of the kernels' ``stream_row``; compute dtype). ``tgt``: localized int64
    (R,) ids (an id outside [0, C) is not in this range), or a soft target (N, C, D); ``w``: the
    range's class weights; ``n_classes``: the global C (smoothing)."""
    N, C, D = x3.shape
    R, cdt, dev = N * D, compute_dtype(x3), x3.device
    soft = tgt if tgt.is_floating_point() else None
    eps, softcap, scale = opts.label_smoothing, opts.softcap, opts.logit_scale
    m = torch.full((R,), float("-inf"), dtype=cdt, device=dev)
    s, acc, a_sum = (torch.zeros(R, dtype=cdt, device=dev) for _ in range(3))
    for c0 in range(0, C, row_blocks.CHUNK_C):
        c1 = min(C, c0 + row_blocks.CHUNK_C)
        z = transform_logits(row_blocks.rows(x3, c0, c1, cdt), scale, softcap)
        m, s, ref_old, ref_new = online_lse_update(m, s, z)
        if soft is not None or eps > 0:
            a = row_blocks.smooth_coef(soft, w, c0, c1, n_classes, eps, cdt, dev)
            acc, a_sum = weighted_sum_update(acc, a_sum, a, z, None, ref_old, ref_new)
    zy = torch.zeros_like(s)
    if soft is None:
        owned = (tgt >= 0) & (tgt < C)
        x_y = row_blocks.target_gather(x3, torch.where(owned, tgt, torch.zeros_like(tgt)), cdt)
        zy = torch.where(owned, transform_logits(x_y, scale, softcap), zy)
    return torch.stack([m, s, acc, a_sum, zy], dim=1).unsqueeze(0)


def merge_splits(part: Tensor) -> Tensor:
    """(S, R, 5) partials of S disjoint class ranges -> the (R, 5) partials of their union."""
    if part.shape[0] == 1:
        return part[0]
    m, s, acc, a_sum, z_y = part.unbind(2)
    m_r = m.amax(0)
    ref_r = safe_ref(m_r)
    s_r = (s * torch.exp(m - ref_r)).sum(0)  # exactly 0 for a range with m = -inf
    acc_r = (acc + (safe_ref(m) - ref_r) * a_sum).sum(0)
    return torch.stack([m_r, s_r, acc_r, a_sum.sum(0), z_y.sum(0)], dim=1)


def combine(part: Tensor, target: Tensor, weight: Optional[Tensor], n_classes: int,
            opts: LossOptions, group: Any = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, stats) from (S, R, 5) partials; identical on every rank of ``group``.

    ``target``: global int64 ids (R,), or a soft target (then only its presence matters: the
    partials hold its sums); ``weight``: the global (n_classes,) class weights or None.
    stats = (ref, log s, row weight) is what every backward of the package consumes.
    """
    soft = target.is_floating_point()
    eps = opts.label_smoothing
    p = merge_splits(part)
    m = p[:, M]
    if group is not None:
        m_g = m.clone(memory_format=torch.contiguous_format)  # collectives write in place
        dist.all_reduce(m_g, op=dist.ReduceOp.MAX, group=group)
    else:
        m_g = m
    ref = safe_ref(m_g)
    shift = safe_ref(m) - ref  # <= 0; only differences of maxima, never an lse
    cols = [p[:, S] * torch.exp(m - ref)]  # m = -inf (an all -inf range) gives exactly 0
    if soft:
        cols += [p[:, A] + p[:, ASUM] * shift, p[:, ASUM]]
    else:
        cols.append(p[:, ZY])  # one range owns the target: the sum is exact
        if eps > 0:
            cols.append(p[:, A] + p[:, ASUM] * shift)
    tot = torch.stack(cols, dim=1)
    if group is not None:
        dist.all_reduce(tot, op=dist.ReduceOp.SUM, group=group)
    log_s = torch.log(tot[:, 0])
    lse = ref + log_s
    if soft:
        row_w = tot[:, 2]
        loss = row_w * log_s - tot[:, 1]
        return loss, lse, torch.stack([ref, log_s, row_w], dim=1)
    ok = (target >= 0) & (target < n_classes)
    y_safe = torch.where(ok, target, torch.zeros_like(target))
    w_y = weight.to(m.dtype)[y_safe] if weight is not None else torch.ones_like(m)
    smooth = None
    if eps > 0:
        wsum = weight_total(weight.to(m.dtype).sum() if weight is not None else None, n_classes)
        smooth = wsum * log_s - tot[:, 2]
    loss = hard_target_loss((ref - tot[:, 1]) + log_s, smooth, w_y, eps, n_classes)
    loss, row_w = finish_hard_rows(loss, w_y, target, opts.ignore_index, n_classes)
    return loss, lse, torch.stack([ref, log_s, row_w], dim=1)
