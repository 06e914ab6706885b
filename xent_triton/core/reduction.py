"""The reduction of per-row results: z-loss, token weights, ``mean``/``sum``/``none``, the empty batch,
and the per-call statistics (``LossStats``) — no host sync.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .options import LossOptions, LossStats


def loss_stats(target: Tensor, ent: Tensor, pred: Tensor, ignore_index: int, return_predicted: bool,
               to_output) -> LossStats:
    """LossStats from the forward's per-row entropy and argmax (O(rows) torch ops, no host sync).
    Soft targets: every row counts, and a row is correct when the argmax is the target's argmax."""
    if target.is_floating_point():
        valid = torch.ones(ent.shape, dtype=torch.bool, device=ent.device)
        label = target.argmax(1).reshape(-1)
    else:
        valid = target != ignore_index
        label = target
    n_valid = valid.sum()
    n_correct = ((pred == label) & valid).sum()
    entropy_sum = torch.where(valid, ent, torch.zeros_like(ent)).sum()
    return LossStats(n_valid, n_correct, entropy_sum, to_output(pred) if return_predicted else None)


def reduce_rows(loss_rows: Tensor, lse: Tensor, stats: Tensor, target: Tensor, opts: LossOptions,
                to_output, token_weight: Optional[Tensor] = None) -> Tensor:
    """Apply the z-loss and the reduction to per-row losses; no host sync.

    z-loss: ``lse_square_scale * lse**2`` per non-ignored token (soft targets: every row), added
    per token for ``none``, summed for ``sum``, and for ``mean`` averaged over the non-ignored
    tokens (independent of class weights), beside the cross-entropy's weighted mean
    ``sum_r loss_r / sum_r w_y`` (torch's denominator). ``empty_batch="zero"`` makes a mean with
    a zero denominator 0 (gradients 0, graph connected) instead of NaN. ``token_weight`` (R,)
    multiplies each token's loss (its z-loss too); ``mean`` then divides the cross-entropy by
    sum_r t_r w_y and the z-loss by the sum of t_r over the non-ignored tokens.
    """
    soft = target.is_floating_point()
    valid = None if soft else target != opts.ignore_index
    zl = opts.lse_square_scale
    zrows = None
    if zl != 0:
        lse_v = lse if valid is None else torch.where(valid, lse, torch.zeros_like(lse))
        zrows = zl * lse_v * lse_v
    tw = None
    if token_weight is not None:
        tw = token_weight.to(loss_rows.dtype)
        loss_rows = loss_rows * tw
        zrows = zrows * tw if zrows is not None else None
    if opts.reduction == "none":
        return to_output(loss_rows if zrows is None else loss_rows + zrows)
    if opts.reduction == "sum":
        return loss_rows.sum() if zrows is None else loss_rows.sum() + zrows.sum()
    if soft:
        den = torch.full((), float(loss_rows.shape[0]), dtype=loss_rows.dtype, device=loss_rows.device)
        den = den if tw is None else tw.sum()
        n_valid = den
    else:
        row_w = stats[:, 2].to(loss_rows.dtype)
        den = row_w.sum() if tw is None else (row_w * tw).sum()
        n_valid = valid.sum().to(loss_rows.dtype) if tw is None else torch.where(valid, tw, 0.0).sum()
    if opts.empty_batch == "zero":
        den = torch.where(den == 0, torch.ones_like(den), den)
        n_valid = torch.where(n_valid == 0, torch.ones_like(n_valid), n_valid)
    loss = loss_rows.sum() / den
    if zrows is not None:
        loss = loss + zrows.sum() / n_valid
    return loss
