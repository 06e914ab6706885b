"""The torch twins of the jit helpers of ``core/formulas_triton.py``: one twin per helper, of the
same name, the same formula in plain torch ops, in the same order of operations (tests/core/test_twins.py
runs every pair on the same inputs and fails on a helper without a twin or a twin without a helper).

Shapes: a jit helper sees one row (a block of lanes on axis 0, per-row scalars); its twin sees a
batch of rows (blocks on the LAST dim, per-row tensors of the leading shape). ``HAS_*`` constexpr
flags become the Python conditions they stand for (``softcap > 0``, ``label_smoothing > 0``).
The CPU paths, the vocabulary-parallel torch path, the partials' combination and the KL family's
torch path call these; compositions over whole rows live in ``core/row_blocks.py``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

Number = Union[int, float]


def tanh_f32(u: Tensor) -> Tensor:
    """tanh (the kernels' portable polynomial / exponential form is torch's tanh here)."""
    return torch.tanh(u)


def transform_logits(x: Tensor, logit_scale: float, softcap: float) -> Tensor:
    """z = softcap * tanh(logit_scale * x / softcap) (or logit_scale * x)."""
    z = x * logit_scale
    return softcap * tanh_f32(z / softcap) if softcap > 0 else z


def transform_grad(dz: Tensor, z: Tensor, logit_scale: float, softcap: float,
                   inplace: bool = False) -> Tensor:
    """Chain rule through transform_logits: dL/dx = dL/dz * (1 - (z/softcap)^2) * logit_scale.
    ``inplace``: formed in ``dz`` itself, overwriting ``z`` (the CPU paths' row blocks)."""
    if inplace:
        if softcap > 0:
            dz.mul_(z.div_(softcap).square_().neg_().add_(1.0))
        return dz.mul_(logit_scale) if logit_scale != 1.0 else dz
    if softcap > 0:
        t = z / softcap
        dz = dz * (1.0 - t * t)
    return dz * logit_scale


def safe_ref(m: Tensor) -> Tensor:
    """A finite reference for the running maximum m: m itself, or 0 while m is -inf."""
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def online_lse_update(m: Tensor, s: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fold a block of logits z (rows, c) into the running (max m, sum s) of each row: returns
    (m_new, s_new, ref_old, ref_new), s_new = sum exp(z_seen - ref_new). Nothing seen yet (m = -inf,
    s = 0): no shift (exp(0 - ref_new) overflows for a row below -88, and 0 * inf is NaN)."""
    m_new = torch.maximum(m, z.amax(-1))
    ref_new = safe_ref(m_new)
    ref_old = torch.where(m == float("-inf"), ref_new, m)
    s_new = s * torch.exp(ref_old - ref_new) + torch.exp(z - ref_new[..., None]).sum(-1)
    return m_new, s_new, ref_old, ref_new


def softmax_from_stats(z: Tensor, ref: Tensor, log_s: Tensor) -> Tensor:
    """p = exp((z - ref) - log s) for rows z (rows, c) and per-row (ref, log s)."""
    return torch.exp((z - ref[..., None]) - log_s[..., None])


def weight_total(wsum: Optional[Tensor], n_classes: Number) -> Union[Tensor, float]:
    """W = sum_j w_j: the precomputed sum (a 1-element tensor) for class weights, else n_classes."""
    return wsum.reshape(()) if wsum is not None else n_classes * 1.0


def hard_target_coefficients(g: Tensor, h: Tensor, row_w: Tensor, valid: Tensor, label_smoothing: float,
                             n_classes: Number, w_total) -> tuple[Tensor, Tensor, Tensor]:
    """(coef_p, coef_y, coef_u) of dL/dz_j = coef_p p_j - coef_y [j=y] - coef_u w_j for a hard
    target (per-row tensors); ignored rows (valid False) keep only the lse term h p_j."""
    zero = torch.zeros_like(g)
    coef_y = torch.where(valid, g * (1.0 - label_smoothing) * row_w, zero)
    coef_p = coef_y + h
    coef_u = torch.where(valid, g * label_smoothing / n_classes, zero)
    if label_smoothing > 0:
        coef_p = coef_p + coef_u * w_total
    return coef_p, coef_y, coef_u


def entropy_update(e: Tensor, s_old: Tensor, z: Tensor, ref_old: Tensor, ref_new: Tensor) -> Tensor:
    """Fold a block of logits z (rows, c) into E = sum_j e^{z_j - ref} (z_j - ref) after
    ``online_lse_update`` moved the reference from ref_old to ref_new (s_old: the sum before)."""
    d = ref_old - ref_new
    p = torch.exp(z - ref_new[..., None])
    return torch.exp(d) * (e + d * s_old) + torch.where(p > 0, p * (z - ref_new[..., None]), 0.0).sum(-1)


def entropy_argmax_update(e: Tensor, best: Tensor, best_idx: Tensor, s_old: Tensor, z: Tensor, cols: Tensor,
                          ref_old: Tensor, ref_new: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``entropy_update`` and the running argmax (first index of the maximum) of a block of logits
    z (rows, c) at columns ``cols`` (c,)."""
    e = entropy_update(e, s_old, z, ref_old, ref_new)
    blk_max = z.amax(-1)
    big = torch.full_like(z, 2147483647, dtype=best_idx.dtype)
    blk_idx = torch.where(z == blk_max[..., None], cols.to(best_idx.dtype), big).amin(-1)
    best_idx = torch.where(blk_max > best, blk_idx, best_idx)
    best = torch.maximum(best, blk_max)
    return e, best, best_idx


def smoothed_target(t: Tensor, label_smoothing: float, n_classes: Number) -> Tensor:
    """t' = (1 - eps) t + eps / C: a probability target under label smoothing."""
    return t * (1.0 - label_smoothing) + label_smoothing / n_classes if label_smoothing > 0 else t


def weighted_sum_update(acc: Tensor, a_sum: Tensor, a: Tensor, z: Tensor, mask: Optional[Tensor],
                        ref_old: Tensor, ref_new: Tensor) -> tuple[Tensor, Tensor]:
    """Fold a block of coefficients a ((rows, c) or (1, c)) at logits z (rows, c) into
    A = sum_j a_j (z_j - ref) and a_sum = sum_j a_j after the reference moved from ref_old to
    ref_new; ``mask`` None: every lane is real (the torch paths' blocks are exact)."""
    d = z - ref_new[..., None]
    if mask is not None:
        d = torch.where(mask, d, 0.0)
    acc = acc + (ref_old - ref_new) * a_sum + (a * d).sum(-1)
    a_sum = a_sum + a.sum(-1)
    return acc, a_sum


def hard_target_loss(nll_y: Tensor, smooth: Optional[Tensor], w_y: Tensor, label_smoothing: float,
                     n_classes: Number) -> Tensor:
    """loss = (1 - eps) w_y nll_y + eps / C smooth, nll_y = lse - z_y, smooth = sum_j w_j (lse - z_j)
    (None without smoothing)."""
    loss = (1.0 - label_smoothing) * w_y * nll_y
    if label_smoothing > 0:
        loss = loss + label_smoothing / n_classes * smooth
    return loss


def finish_hard_rows(loss: Tensor, w_y: Tensor, y: Tensor, ignore_index: int,
                     n_classes: Number) -> tuple[Tensor, Tensor]:
    """(loss, row weight) of hard-target rows: 0 for ignored rows, NaN for out-of-range ids (no
    host sync), else (loss, w_y)."""
    valid = y != ignore_index
    ok = valid & (y >= 0) & (y < n_classes)
    bad = valid & ~ok
    nan = torch.full_like(loss, float("nan"))
    row_w = torch.where(bad, nan, torch.where(ok, w_y, torch.zeros_like(w_y)))
    loss = torch.where(bad, nan, torch.where(ok, loss, torch.zeros_like(loss)))
    return loss, row_w


def soft_target_grad(g: Tensor, z: Tensor, ref: Tensor, log_s: Tensor, label_smoothing: float) -> Tensor:
    """dL/dt_j = g (1 - eps) ((ref - z_j) + log s) for rows z (rows, c), per-row g, ref, log s."""
    return g[..., None] * (1.0 - label_smoothing) * ((ref[..., None] - z) + log_s[..., None])


def entropy_from_sums(log_s: Tensor, e: Tensor, s: Tensor) -> Tensor:
    """H = log s - E / s (``entropy_argmax_update``'s sums)."""
    return log_s - e / s
