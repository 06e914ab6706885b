"""The CPU path: the kernels' contracts in plain torch ops, and the torch twins of the jit
helpers of ``kernels/common.py`` (same names, same formulas).

``forward_rows`` / ``backward_rows`` run when Triton cannot (CPU tensors without
``TRITON_INTERPRET=1``, float64 logits): the kernels' algorithm (online log-sum-exp over chunks of
``CHUNK_C`` classes). Memory stays bounded: a few (rows x CHUNK_C) temporaries besides the
gradient itself. They compute in float64 for float64 logits, else in float32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .options import LossOptions
from .runtime import compute_dtype

CHUNK_C = 8192


def transform_logits(x: Tensor, logit_scale: float, softcap: float) -> Tensor:
    z = x * logit_scale
    return softcap * torch.tanh(z / softcap) if softcap > 0 else z


def transform_grad(dz: Tensor, z: Tensor, logit_scale: float, softcap: float) -> Tensor:
    """Chain rule through transform_logits: dL/dx = dL/dz * logit_scale * (1 - (z/softcap)^2)."""
    return dz * logit_scale * ((1 - (z / softcap) ** 2) if softcap > 0 else 1.0)


def hard_target_coefficients(g: Tensor, h: Tensor, row_w: Tensor, valid: Tensor, label_smoothing: float,
                             n_classes: int, w_total) -> tuple[Tensor, Tensor, Tensor]:
    """Twin of the jit helper: (coef_p, coef_y, coef_u) of dL/dz_j = coef_p p_j - coef_y [j=y]
    - coef_u w_j for a hard target (per-row tensors)."""
    zero = torch.zeros_like(g)
    coef_y = torch.where(valid, g * (1 - label_smoothing) * row_w, zero)
    coef_u = torch.where(valid, g * label_smoothing / n_classes, zero)
    coef_p = coef_y + h
    if label_smoothing > 0:
        coef_p = coef_p + coef_u * w_total
    return coef_p, coef_y, coef_u


def finish_hard_rows(loss: Tensor, w_y: Tensor, target: Tensor, ignore_index: int,
                     n_classes: int) -> tuple[Tensor, Tensor]:
    """(loss, row weight) of hard-target rows: 0 for ignored rows, NaN for out-of-range ids (no
    host sync). The one place where the kernels' masking is written in torch."""
    valid = target != ignore_index
    ok = valid & (target >= 0) & (target < n_classes)
    bad = valid & ~ok
    nan = torch.full_like(loss, float("nan"))
    row_w = torch.where(bad, nan, torch.where(ok, w_y, torch.zeros_like(w_y)))
    loss = torch.where(bad, nan, torch.where(ok, loss, torch.zeros_like(loss)))
    return loss, row_w


def rows(x3: Tensor, c0: int, c1: int, cdt: torch.dtype) -> Tensor:
    """Columns [c0, c1) of an (N, C, D) tensor as (N*D, c1-c0) in the compute dtype."""
    return x3[:, c0:c1, :].permute(0, 2, 1).reshape(-1, c1 - c0).to(cdt)


def safe_ref(m: Tensor) -> Tensor:
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def smooth_coef(soft: Optional[Tensor], weight, c0, c1, C, eps, cdt, device):
    """a_j for the chunk: w_j t'_j (soft) or w_j (hard smoothing), shape (R, c) or (1, c)."""
    if soft is not None:
        a = rows(soft, c0, c1, cdt)
        if eps > 0:
            a = a * (1 - eps) + eps / C
    else:
        a = torch.ones(1, c1 - c0, dtype=cdt, device=device)
    if weight is not None:
        a = a * weight[c0:c1].to(cdt)
    return a


def target_gather(x3: Tensor, y_safe: Tensor, cdt) -> Tensor:
    N, _, D = x3.shape
    return x3.gather(1, y_safe.view(N, 1, D)).reshape(-1).to(cdt)


def forward_rows(x3: Tensor, target: Tensor, weight: Optional[Tensor],
                 opts: LossOptions) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss, lse and stats (ref, log s, row weight) of an (N, C, D) logits view: the
    contract of ``cross_entropy_fwd_kernel``.

    ``target`` is int64 (N*D,) class ids, or a float (N, C, D) view of probabilities (soft).
    Returns float32 tensors (float64 for float64 logits) of shapes (R,), (R,), (R, 3).
    """
    N, C, D = x3.shape
    R, cdt, dev = N * D, compute_dtype(x3), x3.device
    soft = target if target.is_floating_point() else None
    eps, softcap, scale = opts.label_smoothing, opts.softcap, opts.logit_scale
    m = torch.full((R,), float("-inf"), dtype=cdt, device=dev)
    s = torch.zeros(R, dtype=cdt, device=dev)
    acc = torch.zeros(R, dtype=cdt, device=dev)
    a_sum = torch.zeros(R, dtype=cdt, device=dev)
    for c0 in range(0, C, CHUNK_C):
        c1 = min(C, c0 + CHUNK_C)
        z = transform_logits(rows(x3, c0, c1, cdt), scale, softcap)
        m_new = torch.maximum(m, z.amax(1))
        ref_old, ref_new = safe_ref(m), safe_ref(m_new)
        s = s * torch.exp(ref_old - ref_new) + torch.exp(z - ref_new[:, None]).sum(1)
        if soft is not None or eps > 0:
            a = smooth_coef(soft, weight, c0, c1, C, eps, cdt, dev)
            acc = acc + (ref_old - ref_new) * a_sum + (a * (z - ref_new[:, None])).sum(1)
            a_sum = a_sum + a.sum(1)
        m = m_new
    ref = safe_ref(m)
    log_s = torch.log(s)
    lse = ref + log_s
    if soft is not None:
        return a_sum * log_s - acc, lse, torch.stack([ref, log_s, a_sum], dim=1)
    ok = (target >= 0) & (target < C)
    y_safe = torch.where(ok, target, torch.zeros_like(target))
    z_y = transform_logits(target_gather(x3, y_safe, cdt), scale, softcap)
    w_y = weight.to(cdt)[y_safe] if weight is not None else torch.ones_like(z_y)
    loss = (1 - eps) * w_y * ((ref - z_y) + log_s)
    if eps > 0:
        wsum = weight.to(cdt).sum() if weight is not None else C
        loss = loss + eps / C * (wsum * log_s - acc)
    loss, row_w = finish_hard_rows(loss, w_y, target, opts.ignore_index, C)
    return loss, lse, torch.stack([ref, log_s, row_w], dim=1)


def backward_rows(x3: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                  dloss: Tensor, dlse: Optional[Tensor], opts: LossOptions, out: Tensor,
                  n_classes: Optional[int] = None, weight_sum: Optional[Tensor] = None) -> Tensor:
    """dL/dx written into ``out`` (an (N, C, D) tensor; may be ``x3`` itself), chunk by chunk:
    the contract of ``cross_entropy_bwd_kernel``.

    ``n_classes`` / ``weight_sum`` override C and sum(weight) in the smoothing terms (a vocabulary
    shard passes the global values; ``weight`` is then the shard's slice).
    """
    N, C, D = x3.shape
    n = n_classes if n_classes is not None else C
    cdt, dev = compute_dtype(x3), x3.device
    soft = target if target.is_floating_point() else None
    eps, softcap, scale = opts.label_smoothing, opts.softcap, opts.logit_scale
    ref, log_s, row_w = (stats[:, i].to(cdt) for i in range(3))
    g = dloss.to(cdt)
    h = dlse.to(cdt) if dlse is not None else torch.zeros_like(g)
    if soft is not None:
        coef_p = g * row_w + h
        active = torch.ones_like(g, dtype=torch.bool)
    else:
        valid = target != opts.ignore_index
        if weight_sum is not None:
            wsum = weight_sum.to(cdt).reshape(())
        else:
            wsum = weight.to(cdt).sum() if weight is not None else n
        coef_p, coef_y, coef_u = hard_target_coefficients(g, h, row_w, valid, eps, n, wsum)
        active = valid | (dlse is not None)
    for c0 in range(0, C, CHUNK_C):
        c1 = min(C, c0 + CHUNK_C)
        z = transform_logits(rows(x3, c0, c1, cdt), scale, softcap)
        dz = coef_p[:, None] * torch.exp((z - ref[:, None]) - log_s[:, None])
        if soft is not None:
            dz = dz - g[:, None] * smooth_coef(soft, weight, c0, c1, n, eps, cdt, dev)
        else:
            cols = torch.arange(c0, c1, device=dev)
            hit = cols[None, :] == target[:, None]
            dz = dz - torch.where(hit, coef_y[:, None], torch.zeros_like(dz))
            if eps > 0:
                w = weight[c0:c1].to(cdt)[None, :] if weight is not None else 1.0
                dz = dz - coef_u[:, None] * w
        dz = transform_grad(dz, z, scale, softcap)
        dz = torch.where(active[:, None], dz, torch.zeros_like(dz))
        out[:, c0:c1, :].copy_(dz.view(N, D, c1 - c0).permute(0, 2, 1))
    return out
