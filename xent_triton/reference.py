"""Pure-PyTorch implementations: the CPU fallback and the tests' ground truth.

Two things live here:

* ``forward_rows`` / ``backward_rows``: the same contract and the same algorithm as the Triton
  kernels (online log-sum-exp over chunks of ``CHUNK_C`` classes), in plain torch ops. They run
  when Triton cannot (CPU tensors without ``TRITON_INTERPRET=1``, float64 logits). Memory stays
  bounded: a few (rows x CHUNK_C) temporaries, never rows x C, besides the gradient itself.
  They compute in float64 for float64 logits, else in float32.
* ``cross_entropy_composed``: the semantics spelled with ``torch.nn.functional.cross_entropy`` and
  ``torch.logsumexp`` on the full tensor: the independent truth the tests compare against (in
  float64), and "PyTorch's own error" when evaluated in a low-precision dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_C = 8192


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _transform(x: Tensor, logit_scale: float, softcap: float) -> Tensor:
    z = x * logit_scale
    return softcap * torch.tanh(z / softcap) if softcap > 0 else z


def _rows(x3: Tensor, c0: int, c1: int, cdt: torch.dtype) -> Tensor:
    """Columns [c0, c1) of an (N, C, D) tensor as (N*D, c1-c0) in the compute dtype."""
    return x3[:, c0:c1, :].permute(0, 2, 1).reshape(-1, c1 - c0).to(cdt)


def _safe_ref(m: Tensor) -> Tensor:
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def _smooth_coef(soft: Optional[Tensor], weight, c0, c1, C, eps, cdt, device):
    """a_j for the chunk: w_j t'_j (soft) or w_j (hard smoothing), shape (R, c) or (1, c)."""
    if soft is not None:
        a = _rows(soft, c0, c1, cdt)
        if eps > 0:
            a = a * (1 - eps) + eps / C
    else:
        a = torch.ones(1, c1 - c0, dtype=cdt, device=device)
    if weight is not None:
        a = a * weight[c0:c1].to(cdt)
    return a


def _target_gather(x3: Tensor, y_safe: Tensor, cdt) -> Tensor:
    N, _, D = x3.shape
    return x3.gather(1, y_safe.view(N, 1, D)).reshape(-1).to(cdt)


def forward_rows(x3: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                 label_smoothing: float, lse_square_scale: float, softcap: float,
                 logit_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss, lse and stats (ref, log s, row weight) of an (N, C, D) logits view.

    ``target`` is int64 (N*D,) class ids, or a float (N, C, D) view of probabilities (soft).
    Returns float32 tensors (float64 for float64 logits) of shapes (R,), (R,), (R, 3).
    """
    N, C, D = x3.shape
    R, cdt, dev = N * D, _compute_dtype(x3), x3.device
    soft = target if target.is_floating_point() else None
    eps = label_smoothing
    m = torch.full((R,), float("-inf"), dtype=cdt, device=dev)
    s = torch.zeros(R, dtype=cdt, device=dev)
    acc = torch.zeros(R, dtype=cdt, device=dev)
    a_sum = torch.zeros(R, dtype=cdt, device=dev)
    for c0 in range(0, C, CHUNK_C):
        c1 = min(C, c0 + CHUNK_C)
        z = _transform(_rows(x3, c0, c1, cdt), logit_scale, softcap)
        m_new = torch.maximum(m, z.amax(1))
        ref_old, ref_new = _safe_ref(m), _safe_ref(m_new)
        s = s * torch.exp(ref_old - ref_new) + torch.exp(z - ref_new[:, None]).sum(1)
        if soft is not None or eps > 0:
            a = _smooth_coef(soft, weight, c0, c1, C, eps, cdt, dev)
            acc = acc + (ref_old - ref_new) * a_sum + (a * (z - ref_new[:, None])).sum(1)
            a_sum = a_sum + a.sum(1)
        m = m_new
    ref = _safe_ref(m)
    log_s = torch.log(s)
    lse = ref + log_s
    if soft is not None:
        row_w = a_sum
        loss = a_sum * log_s - acc + lse_square_scale * lse * lse
    else:
        valid = target != ignore_index
        ok = valid & (target >= 0) & (target < C)
        bad = valid & ~ok
        y_safe = torch.where(ok, target, torch.zeros_like(target))
        z_y = _transform(_target_gather(x3, y_safe, cdt), logit_scale, softcap)
        w_y = weight.to(cdt)[y_safe] if weight is not None else torch.ones_like(z_y)
        loss = (1 - eps) * w_y * ((ref - z_y) + log_s) + lse_square_scale * lse * lse
        if eps > 0:
            wsum = weight.to(cdt).sum() if weight is not None else C
            loss = loss + eps / C * (wsum * log_s - acc)
        nan = torch.full_like(loss, float("nan"))
        row_w = torch.where(bad, nan, torch.where(ok, w_y, torch.zeros_like(w_y)))
        loss = torch.where(bad, nan, torch.where(ok, loss, torch.zeros_like(loss)))
    return loss, lse, torch.stack([ref, log_s, row_w], dim=1)


def backward_rows(x3: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                  dloss: Tensor, dlse: Optional[Tensor], ignore_index: int, label_smoothing: float,
                  lse_square_scale: float, softcap: float, logit_scale: float,
                  out: Tensor, n_classes: Optional[int] = None,
                  weight_sum: Optional[Tensor] = None) -> Tensor:
    """dL/dx written into ``out`` (an (N, C, D) tensor; may be ``x3`` itself), chunk by chunk.

    ``n_classes`` / ``weight_sum`` override C and sum(weight) in the smoothing terms (a vocabulary
    shard passes the global values; ``weight`` is then the shard's slice).
    """
    N, C, D = x3.shape
    n = n_classes if n_classes is not None else C
    cdt, dev = _compute_dtype(x3), x3.device
    soft = target if target.is_floating_point() else None
    eps = label_smoothing
    ref, log_s, row_w = (stats[:, i].to(cdt) for i in range(3))
    g = dloss.to(cdt)
    h = dlse.to(cdt) if dlse is not None else torch.zeros_like(g)
    lse = ref + log_s
    if soft is not None:
        coef_p = g * (row_w + 2 * lse_square_scale * lse) + h
        valid = torch.ones_like(g, dtype=torch.bool)
        active = valid
    else:
        valid = target != ignore_index
        coef_p = torch.where(valid, g * ((1 - eps) * row_w + 2 * lse_square_scale * lse), torch.zeros_like(g))
        if eps > 0:
            if weight_sum is not None:
                wsum = weight_sum.to(cdt).reshape(())
            else:
                wsum = weight.to(cdt).sum() if weight is not None else n
            coef_p = coef_p + torch.where(valid, g * eps / n * wsum, torch.zeros_like(g))
        coef_p = coef_p + h
        active = valid | (dlse is not None)
    for c0 in range(0, C, CHUNK_C):
        c1 = min(C, c0 + CHUNK_C)
        z = _transform(_rows(x3, c0, c1, cdt), logit_scale, softcap)
        dz = coef_p[:, None] * torch.exp((z - ref[:, None]) - log_s[:, None])
        if soft is not None:
            dz = dz - g[:, None] * _smooth_coef(soft, weight, c0, c1, n, eps, cdt, dev)
        else:
            cols = torch.arange(c0, c1, device=dev)
            hit = (cols[None, :] == target[:, None]) & valid[:, None]
            dz = dz - torch.where(hit, (g * (1 - eps) * row_w)[:, None], torch.zeros_like(dz))
            if eps > 0:
                w = weight[c0:c1].to(cdt)[None, :] if weight is not None else 1.0
                dz = dz - torch.where(valid[:, None], (g * eps / n)[:, None] * w, torch.zeros_like(dz))
        dz = dz * logit_scale * ((1 - (z / softcap) ** 2) if softcap > 0 else 1.0)
        dz = torch.where(active[:, None], dz, torch.zeros_like(dz))
        out[:, c0:c1, :].copy_(dz.view(N, D, c1 - c0).permute(0, 2, 1))
    return out


def cross_entropy_composed(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                           ignore_index: int = -100, reduction: str = "mean",
                           label_smoothing: float = 0.0, *, lse_square_scale: float = 0.0,
                           softcap: Optional[float] = None, logit_scale: float = 1.0,
                           return_lse: bool = False):
    """The library's semantics written with torch's own ops on the full tensor (tests' truth)."""
    z = input * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    cdim = 0 if input.dim() == 1 else 1
    loss = F.cross_entropy(z, target, weight, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    lse = torch.logsumexp(z, dim=cdim)
    soft = target.is_floating_point()
    valid = torch.ones_like(lse, dtype=torch.bool) if soft else target != ignore_index
    loss = loss + lse_square_scale * torch.where(valid, lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        out = loss
    elif reduction == "sum":
        out = loss.sum()
    elif soft:
        out = loss.sum() / lse.numel()
    else:
        w_y = weight[target.clamp(0, input.shape[cdim] - 1)] if weight is not None else torch.ones_like(lse)
        out = loss.sum() / torch.where(valid, w_y, torch.zeros_like(w_y)).sum()
    return (out, lse) if return_lse else out
