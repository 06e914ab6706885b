"""The CE kernels' contracts in plain torch ops: the CPU path.

``forward_rows_torch`` / ``backward_rows_torch`` run when Triton cannot (CPU tensors without
``TRITON_INTERPRET=1``, float64 logits). They walk bounded blocks of rows (about ``BLOCK_ELEMS``
logits each, so temporaries never grow with N): hard targets take whole rows with torch's
vectorised ops (max, exp, sum, scatter; the gradient formed in ``out`` itself when it can be),
soft targets the kernels' online log-sum-exp over chunks of ``CHUNK_C`` classes. They compute in
float64 for float64 logits, else in float32. The formulas are the torch twins of
``core/formulas_torch.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core import row_blocks
from ..core.formulas_torch import (
    finish_hard_rows,
    hard_target_coefficients,
    hard_target_loss,
    safe_ref,
    softmax_from_stats,
    transform_grad,
    transform_logits,
    weight_total,
)
from ..core.options import LossOptions
from ..core.partials import chunked_partials, combine
from ..core.row_blocks import block_rows, block_samples, row_buffer, rows, smooth_coef, transformed
from ..core.runtime import compute_dtype


def forward_chunked(x3: Tensor, target: Tensor, weight: Optional[Tensor],
                    opts: LossOptions) -> tuple[Tensor, Tensor, Tensor]:
    """``forward_rows_torch`` of class-probability targets (a float (N, C, D) ``target``): the partials of
    the whole vocabulary by the online log-sum-exp over CHUNK_C-class chunks, combined as one
    vocabulary shard's (``core.partials``; hard targets take ``forward_hard_block``)."""
    C = x3.shape[1]
    return combine(chunked_partials(x3, target, weight, C, opts), target, weight, C, opts)


def backward_chunked(x3: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                     dloss: Tensor, dlse: Optional[Tensor], opts: LossOptions, out: Tensor,
                     n_classes: Optional[int] = None, weight_sum: Optional[Tensor] = None) -> Tensor:
    """``backward_rows_torch`` of class-probability targets, chunk by chunk of CHUNK_C classes (hard
    targets take ``backward_hard_block``). ``weight_sum`` is unused here (the soft target's
    coefficients carry the class weights); kept for ``backward_rows_torch``' one call shape."""
    N, C, D = x3.shape
    n = n_classes if n_classes is not None else C
    cdt, dev = compute_dtype(x3), x3.device
    eps, softcap, scale = opts.label_smoothing, opts.softcap, opts.logit_scale
    ref, log_s, row_w = (stats[:, i].to(cdt) for i in range(3))
    g = dloss.to(cdt)
    h = dlse.to(cdt) if dlse is not None else torch.zeros_like(g)
    coef_p = g * row_w + h
    for c0 in range(0, C, row_blocks.CHUNK_C):
        c1 = min(C, c0 + row_blocks.CHUNK_C)
        z = transform_logits(rows(x3, c0, c1, cdt), scale, softcap)
        dz = coef_p[:, None] * softmax_from_stats(z, ref, log_s)
        dz = dz - g[:, None] * smooth_coef(target, weight, c0, c1, n, eps, cdt, dev)
        dz = transform_grad(dz, z, scale, softcap)
        out[:, c0:c1, :].copy_(dz.view(N, D, c1 - c0).permute(0, 2, 1))
    return out


def forward_rows_torch(x3: Tensor, target: Tensor, weight: Optional[Tensor],
                 opts: LossOptions) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss, lse and stats (ref, log s, row weight) of an (N, C, D) logits view: the
    contract of ``cross_entropy_fwd_kernel``, in bounded row blocks (module docstring).

    ``target`` is int64 (N*D,) class ids, or a float (N, C, D) view of probabilities (soft).
    Returns float32 tensors (float64 for float64 logits) of shapes (R,), (R,), (R, 3).

    Example:
        >>> loss, lse, stats = forward_rows_torch(torch.randn(8, 100, 1), torch.randint(0, 100, (8,)), None,
        ...                                 LossOptions())
    """
    N, C, D = x3.shape
    cdt, dev = compute_dtype(x3), x3.device
    loss = torch.empty(N * D, dtype=cdt, device=dev)
    lse = torch.empty(N * D, dtype=cdt, device=dev)
    stats = torch.empty((N * D, 3), dtype=cdt, device=dev)
    soft = target.is_floating_point()
    step = block_samples(C, D)
    zbuf = None if soft or (x3.dtype == cdt and D == 1) else row_buffer(x3, step, cdt)
    lbuf = None if soft else row_buffer(x3, step, cdt)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        rs = slice(n0 * D, n1 * D)
        if soft:
            out = forward_chunked(x3[n0:n1], target[n0:n1], weight, opts)
        else:
            out = forward_hard_block(block_rows(x3[n0:n1], cdt, zbuf), target[rs], weight, opts, C, lbuf)
        for dst, src in zip((loss[rs], lse[rs], stats[rs]), out):
            dst.copy_(src)
    return loss, lse, stats


def forward_hard_block(z: Tensor, target: Tensor, weight: Optional[Tensor], opts: LossOptions,
                       C: int, buf: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, lse, stats) of (rows, C) logits ``z`` (any float dtype; never written) and hard ids,
    from torch's fused log_softmax in the compute dtype (into ``buf`` when given): log s =
    -max_j logp_j exactly as the kernels keep it (relative to the row maximum), loss = -(1-eps)
    w_y logp_y - eps/C sum_j w_j logp_j."""
    eps = opts.label_smoothing
    cdt = compute_dtype(z)
    t = transformed(z.to(cdt), opts) if opts.logit_scale != 1.0 or opts.has_softcap else z.to(cdt)
    logp = torch.log_softmax(t, 1) if buf is None else \
        torch.log_softmax(t, 1, out=buf[:t.numel()].view(t.shape))
    ref = safe_ref(t.amax(1).to(cdt))
    log_s = -logp.amax(1)
    ok = (target >= 0) & (target < C)
    y_safe = torch.where(ok, target, torch.zeros_like(target))
    w_y = weight.to(cdt)[y_safe] if weight is not None else torch.ones_like(ref)
    # lse - z_y = -logp_y and sum_j w_j (lse - z_j) = -sum_j w_j logp_j (negations are exact)
    smooth = None
    if eps > 0:
        smooth = -(logp @ weight.to(cdt) if weight is not None else logp.sum(1))
    loss = hard_target_loss(-logp.gather(1, y_safe[:, None]).squeeze(1), smooth, w_y, eps, C)
    loss, row_w = finish_hard_rows(loss, w_y, target, opts.ignore_index, C)
    return loss, ref + log_s, torch.stack([ref, log_s, row_w], dim=1)


def backward_rows_torch(x3: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                  dloss: Tensor, dlse: Optional[Tensor], opts: LossOptions, out: Tensor,
                  n_classes: Optional[int] = None, weight_sum: Optional[Tensor] = None) -> Tensor:
    """dL/dx written into ``out`` (an (N, C, D) tensor; may be ``x3`` itself), in bounded row
    blocks: the contract of ``cross_entropy_bwd_kernel``.

    ``n_classes`` / ``weight_sum`` override C and sum(weight) in the smoothing terms (a vocabulary
    shard passes the global values; ``weight`` is then the shard's slice).

    Example:
        >>> x = torch.randn(8, 100, 1); y = torch.randint(0, 100, (8,))
        >>> _, _, st = forward_rows_torch(x, y, None, LossOptions())
        >>> g = backward_rows_torch(x, y, None, st, torch.full((8,), 0.125), None, LossOptions(),
        ...                   torch.empty_like(x))
    """
    N, C, D = x3.shape
    step = block_samples(C, D)
    soft = target.is_floating_point()
    cdt = compute_dtype(x3)
    buf = None if soft or (D == 1 and out.dtype == cdt) else row_buffer(x3, step, cdt)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        rs = slice(n0 * D, n1 * D)
        h = dlse[rs] if dlse is not None else None
        if soft:
            backward_chunked(x3[n0:n1], target[n0:n1], weight, stats[rs], dloss[rs], h, opts, out[n0:n1],
                             n_classes, weight_sum)
        else:
            backward_hard_block(x3[n0:n1], target[rs], weight, stats[rs], dloss[rs], h, opts, out[n0:n1],
                                n_classes, weight_sum, buf)
    return out


def backward_hard_block(xb: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                        dloss: Tensor, dlse: Optional[Tensor], opts: LossOptions, out: Tensor,
                        n_classes: Optional[int], weight_sum: Optional[Tensor],
                        buf: Optional[Tensor] = None) -> None:
    """One (n, C, D) block of ``backward_rows_torch`` for hard targets, formed in ``out`` when it can,
    else in ``buf`` (a flat compute-dtype buffer) and copied out. Inactive rows have all
    coefficients 0, so their gradient is 0 x p = 0 with no extra pass."""
    n, C, D = xb.shape
    nc = n_classes if n_classes is not None else C
    cdt = compute_dtype(xb)
    z = xb[:, :, 0] if D == 1 else xb.permute(0, 2, 1).reshape(-1, C)
    transform = opts.logit_scale != 1.0 or opts.has_softcap
    t = transformed(z.to(cdt), opts) if transform else z
    ref, log_s, row_w = (stats[:, i].to(cdt) for i in range(3))
    g = dloss.to(cdt)
    h = dlse.to(cdt) if dlse is not None else torch.zeros_like(g)
    valid = target != opts.ignore_index
    wsum = weight_total(weight_sum.to(cdt) if weight_sum is not None else
                        (weight.to(cdt).sum() if weight is not None else None), nc)
    coef_p, coef_y, coef_u = hard_target_coefficients(g, h, row_w, valid, opts.label_smoothing, nc, wsum)
    direct = D == 1 and out.dtype == cdt
    if direct:
        dz = out[:, :, 0]
    else:
        dz = buf[:t.numel()].view(t.shape) if buf is not None else torch.empty(t.shape, dtype=cdt,
                                                                                device=t.device)
    if t.dtype == cdt:
        torch.sub(t, (ref + log_s)[:, None], out=dz)
    else:  # upcast in place: a mixed-dtype sub would upcast t into a temporary first
        dz.copy_(t).sub_((ref + log_s)[:, None])
    dz.exp_().mul_(coef_p[:, None])
    here = (target >= 0) & (target < C)
    y_idx = torch.where(here, target, torch.zeros_like(target))
    dz.scatter_add_(1, y_idx[:, None], -torch.where(here, coef_y, torch.zeros_like(coef_y))[:, None])
    if opts.has_smoothing:
        if weight is not None:
            dz.addr_(coef_u, weight.to(cdt), alpha=-1)
        else:
            dz.sub_(coef_u[:, None])
    if transform:  # t (a copy: transformed) is overwritten
        transform_grad(dz, t, opts.logit_scale, opts.softcap, inplace=True)
    if not direct:
        out.copy_(dz.view(n, D, C).permute(0, 2, 1))
