"""The reduction of per-row results: z-loss, token weights, ``mean``/``sum``/``none``, the empty batch,
and the per-call statistics (``LossStats``) — no host sync.

One reduction for every loss: ``row_sums`` forms the (4,) sums [loss, denominator, z-loss, valid
count] of the rows once, ``finish_sums`` turns them into the ``mean`` / ``sum`` once. Between the
two, DTensor's ``finish`` all-reduces the sums over the batch-sharded mesh dims; the chunked head
takes ``weight_sums`` / ``guard_empty`` up front (its gradients are scaled before the loss exists).
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


LOSS, DEN, ZLOSS, N_VALID = range(4)  # the per-row sums, in this order


def weight_sums(den_rows: Tensor, valid: Tensor,
                token_weight: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(denominator, valid count) of a mean: sum_r t_r d_r and sum of t_r over the valid rows
    (t_r = 1 without token weights). ``den_rows``: each row's share of the denominator (w_y of a hard
    target, 0 ignored, NaN out of range; 1 for a soft target or a KL row; the valid flag with labels)."""
    dt = den_rows.dtype
    if token_weight is None:
        return den_rows.sum(), valid.sum().to(dt)
    tw = token_weight.to(dt)
    return (den_rows * tw).sum(), torch.where(valid, tw, torch.zeros_like(tw)).sum()


def row_sums(loss_rows: Tensor, den_rows: Tensor, valid: Tensor, lse: Optional[Tensor], opts: LossOptions,
             token_weight: Optional[Tensor] = None) -> Tensor:
    """The (4,) sums [loss, denominator, z-loss, valid count] of this process's rows, in the rows'
    dtype: what a ``mean`` / ``sum`` needs, computed once; several processes all-reduce them (SUM)
    before ``finish_sums`` (DTensor's batch-sharded mesh dims). ``lse``: None or no z-loss: 0.
    z-loss: ``lse_square_scale * lse**2`` per valid row; token weights multiply each row's loss and
    z-loss (``weight_sums`` for the denominators)."""
    tw = token_weight.to(loss_rows.dtype) if token_weight is not None else None
    den, n_valid = weight_sums(den_rows, valid, tw)
    loss = (loss_rows if tw is None else loss_rows * tw).sum()
    zl = opts.lse_square_scale
    if zl != 0 and lse is not None:
        lse_v = torch.where(valid, lse, torch.zeros_like(lse))
        zrows = zl * lse_v * lse_v
        z = (zrows if tw is None else zrows * tw).sum()
    else:
        z = torch.zeros_like(loss)
    return torch.stack([loss, den, z.to(loss.dtype), n_valid.to(loss.dtype)])


def guard_empty(den: Tensor, opts: LossOptions) -> Tensor:
    """``empty_batch="zero"``: a zero denominator reads 1 (a mean over nothing is 0, gradients 0,
    graph connected); ``"nan"``: unchanged (0 / 0 = NaN, as torch)."""
    return torch.where(den == 0, torch.ones_like(den), den) if opts.empty_batch == "zero" else den


def finish_sums(sums: Tensor, opts: LossOptions) -> Tensor:
    """The reduced loss from ``row_sums`` (summed over processes where they are split):
    ``sum``: loss + z-loss; ``mean``: loss / denominator + z-loss / valid count (the z-loss mean is
    independent of class weights), ``guard_empty`` on both denominators."""
    loss, den, z, n_valid = sums.unbind()
    has_z = opts.lse_square_scale != 0
    if opts.reduction == "sum":
        return loss + z if has_z else loss
    out = loss / guard_empty(den, opts)
    return out + z / guard_empty(n_valid, opts) if has_z else out


def reduce_rows(loss_rows: Tensor, lse: Tensor, stats: Tensor, target: Tensor, opts: LossOptions,
                to_output, token_weight: Optional[Tensor] = None) -> Tensor:
    """Apply the z-loss and the reduction to per-row cross-entropy losses; no host sync.

    z-loss: ``lse_square_scale * lse**2`` per non-ignored token (soft targets: every row), added
    per token for ``none``, summed for ``sum``, and for ``mean`` averaged over the non-ignored
    tokens (independent of class weights), beside the cross-entropy's weighted mean
    ``sum_r loss_r / sum_r w_y`` (torch's denominator). ``empty_batch="zero"`` makes a mean with
    a zero denominator 0 (gradients 0, graph connected) instead of NaN. ``token_weight`` (R,)
    multiplies each token's loss (its z-loss too); ``mean`` then divides the cross-entropy by
    sum_r t_r w_y and the z-loss by the sum of t_r over the non-ignored tokens.
    ``mean`` / ``sum``: ``finish_sums(row_sums(...))``, the one reduction of every loss.
    """
    if opts.reduction == "none":
        tw = token_weight.to(loss_rows.dtype) if token_weight is not None else None
        loss_rows = loss_rows if tw is None else loss_rows * tw
        zl = opts.lse_square_scale
        if zl != 0:
            lse_v = torch.where(ce_valid(target, opts, lse), lse, torch.zeros_like(lse))
            zrows = zl * lse_v * lse_v
            loss_rows = loss_rows + (zrows if tw is None else zrows * tw)
        return to_output(loss_rows)
    return finish_sums(ce_row_sums(loss_rows, lse, stats, target, opts, token_weight), opts)


def ce_valid(target: Tensor, opts: LossOptions, like: Tensor) -> Tensor:
    """The rows that count: non-ignored hard targets; every row of a soft target."""
    if target.is_floating_point():
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    return target != opts.ignore_index


def ce_row_sums(loss_rows: Tensor, lse: Tensor, stats: Tensor, target: Tensor, opts: LossOptions,
                token_weight: Optional[Tensor] = None) -> Tensor:
    """``row_sums`` of cross-entropy rows: the denominator is sum_r w_y (stats[:, 2]) for hard
    targets, the row count for soft targets."""
    valid = ce_valid(target, opts, loss_rows)
    den_rows = valid.to(loss_rows.dtype) if target.is_floating_point() else stats[:, 2].to(loss_rows.dtype)
    return row_sums(loss_rows, den_rows, valid, lse, opts, token_weight)
