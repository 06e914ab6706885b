"""The tests' ground truth: the library's semantics spelled with torch's own ops on the full
tensor (``F.cross_entropy``, ``torch.logsumexp``), evaluated in float64 (truth) or in the test
dtype (PyTorch's own error, the yardstick of the tolerance rule)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


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
    zrows = lse_square_scale * torch.where(valid, lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        out = loss + zrows
    elif reduction == "sum":
        out = loss.sum() + zrows.sum()
    elif soft:
        out = (loss.sum() + zrows.sum()) / lse.numel()
    else:
        # torch's weighted mean for the cross-entropy; the z-loss is a per-token mean over the
        # non-ignored tokens (independent of the class weights' scale)
        w_y = weight[target.clamp(0, input.shape[cdim] - 1)] if weight is not None else torch.ones_like(lse)
        out = loss.sum() / torch.where(valid, w_y, torch.zeros_like(w_y)).sum()
        if lse_square_scale != 0:
            out = out + zrows.sum() / valid.sum()
    return (out, lse) if return_lse else out
