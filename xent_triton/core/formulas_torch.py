"""The torch twins of the jit formulas of ``core/formulas_triton.py``: the same names, the same
formulas, in plain torch ops (the CPU path, the vocabulary-parallel torch path and the KL family's
torch path call them).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .options import LossOptions
from .row_blocks import rows


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


def transformed(z: Tensor, opts: LossOptions) -> Tensor:
    if opts.logit_scale == 1.0 and not opts.has_softcap:
        return z
    return transform_logits(z, opts.logit_scale, opts.softcap)
