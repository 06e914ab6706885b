"""Fused linear cross-entropy: implementations, torch.library custom ops and autograd.

Layout: hidden states x (N, D) (any strides), classifier w (C, D) (any strides), bias b (C,)
contiguous or None, targets int64 (N,) of *global* class ids, class weights fp32 (C,) or None.

Building blocks (each runs the Triton kernels when ``ops.uses_triton(x)``, else chunked torch):

* ``forward_partials`` -> (5, splits, N) per-row partial statistics of this weight's classes;
* ``combine`` -> (loss, lse, stats) per row, merging partials (of class splits, or of vocabulary
  shards gathered from other ranks: the door for tensor parallelism);
* ``backward_accumulate`` -> fp32 (dX, dW, db) from per-row stats (possibly global ones) with a
  ``class_offset`` for the targets and the global ``n_classes`` of the smoothing formulas.

Two doors, as in ``ops``: ``LinearCrossEntropyFunction`` (eager) and the custom ops
``xent_triton::linear_cross_entropy_fwd`` / ``_bwd`` with fake impls and registered autograd
(torch.compile). ``linear_cross_entropy_rows`` picks one.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from . import launch
from .ops import _alloc, _is_compiling, uses_triton
from .reference import _safe_ref, _transform

ROW_CHUNK = 1024  # the torch path's tiles: ROW_CHUNK x COL_CHUNK logits at a time
COL_CHUNK = 4096


def _cdt(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _bits(x: Tensor) -> int:
    return 32 if x.dtype == torch.float32 else 16


def _kernel_operands(x: Tensor, w: Tensor, block_rows: int, block_cols: int):
    """(x, w, aligned): the kernels address a tile with int32 offsets from an int64 block base, so
    an operand whose in-tile offsets could pass 2**31 is made contiguous (never for real shapes);
    ``aligned`` = every row starts 16-byte aligned with a unit inner stride (cp.async-able)."""
    def fits(t: Tensor, rows: int) -> bool:
        return (rows - 1) * t.stride(0) + (t.shape[1] - 1) * t.stride(1) < 2**31

    x = x if fits(x, block_rows) else x.contiguous()
    w = w if fits(w, block_cols) else w.contiguous()
    aligned = all(t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
                  for t in (x, w))
    return x, w, aligned


# ------------------------------------------------------------------------------------- forward
def forward_partials(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                     weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
                     softcap: float, logit_scale: float, skip_ignored: bool,
                     class_offset: int = 0) -> Tensor:
    """(5, splits, N) partials (m, s, A, a_sum, z_y) of the logits x wᵀ + b (see the kernel)."""
    N, D = x.shape
    C = w.shape[0]
    if not uses_triton(x):
        return _partials_torch(x, w, b, target, weight, label_smoothing, softcap, logit_scale,
                               class_offset)
    from .kernels.linear_cross_entropy import linear_xent_fwd_kernel

    cfg, _ = launch.linear_configs(_bits(x), _kernel_operands(x, w, 128, 128)[2], w.shape[0])
    x, w, _ = _kernel_operands(x, w, cfg.block_n, cfg.block_v)
    splits, per = launch.linear_forward_splits(N, C, cfg)
    part = _alloc((5, splits, N), torch.float32, x.device)
    if N == 0:
        return part
    linear_xent_fwd_kernel[(splits * triton.cdiv(N, cfg.block_n),)](
        x, *x.stride(), w, *w.stride(), b if b is not None else x, weight if weight is not None else x,
        target, part, N, C, D, class_offset, ignore_index, splits, per, logit_scale, softcap,
        HAS_BIAS=b is not None, HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0,
        HAS_SOFTCAP=softcap > 0, SKIP_IGNORED=skip_ignored, BLOCK_N=cfg.block_n,
        BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, DOT_PRECISION=launch.linear_dot_precision(_bits(x)),
        DOT_UPCAST=_dot_upcast(x), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return part


def _dot_upcast(x: Tensor) -> bool:
    """The CPU interpreter's tl.dot mishandles bf16 (raw bits): feed it fp32 copies there."""
    return launch.interpreting() and x.dtype == torch.bfloat16


def _partials_torch(x, w, b, target, weight, eps, softcap, logit_scale, class_offset) -> Tensor:
    """The kernel's partials in chunked torch (one split), computed in fp32 (fp64 for fp64)."""
    N, C = x.shape[0], w.shape[0]
    cdt = _cdt(x)
    part = torch.zeros((5, 1, N), dtype=cdt, device=x.device)
    part[0].fill_(float("-inf"))
    y_local = target - class_offset
    for r0 in range(0, N, ROW_CHUNK):
        r1 = min(N, r0 + ROW_CHUNK)
        xr = x[r0:r1].to(cdt)
        m, s, acc, a_sum, z_y = (p[0, r0:r1] for p in part)
        for c0 in range(0, C, COL_CHUNK):
            c1 = min(C, c0 + COL_CHUNK)
            z = _logits_torch(xr, w, b, c0, c1, softcap, logit_scale)
            m_new = torch.maximum(m, z.amax(1))
            ref_old, ref_new = _safe_ref(m), _safe_ref(m_new)
            s.mul_(torch.exp(ref_old - ref_new)).add_(torch.exp(z - ref_new[:, None]).sum(1))
            cols = torch.arange(c0, c1, device=x.device)
            z_y.add_(torch.where(cols[None, :] == y_local[r0:r1, None], z, 0.0).sum(1))
            if eps > 0:
                a = weight[c0:c1].to(cdt) if weight is not None else torch.ones(c1 - c0, dtype=cdt, device=x.device)
                acc.add_((ref_old - ref_new) * a_sum + (a * (z - ref_new[:, None])).sum(1))
                a_sum.add_(a.sum())
            m.copy_(m_new)
    return part


def _logits_torch(xr: Tensor, w: Tensor, b: Optional[Tensor], c0: int, c1: int, softcap: float,
                  logit_scale: float) -> Tensor:
    z = xr @ w[c0:c1].to(xr.dtype).t()
    if b is not None:
        z = z + b[c0:c1].to(xr.dtype)
    return _transform(z, logit_scale, softcap)


def combine(part: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
            n_classes: int, label_smoothing: float,
            lse_square_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Merge (5, S, N) partials of disjoint class ranges into per-row (loss, lse, stats) — the
    hard-target formulas of kernels/cross_entropy.py's docstring, in the partials' dtype.

    stats = (ref, log s, w_y) as the core saves them (w_y = 0 if ignored, NaN if out of range).
    """
    m, s, acc, a_sum, z_y = part.unbind(0)
    ref = _safe_ref(m.amax(0))
    # exp(m_k - ref) is 0 for a split that saw no finite logit (m_k = -inf, s_k = 0)
    s_tot = (s * torch.exp(m - ref)).sum(0)
    log_s = torch.log(s_tot)
    lse = ref + log_s
    eps = label_smoothing
    valid = target != ignore_index
    ok = valid & (target >= 0) & (target < n_classes)
    bad = valid & ~ok
    y_safe = torch.where(ok, target, torch.zeros_like(target))
    w_y = weight.to(part.dtype)[y_safe] if weight is not None else torch.ones_like(lse)
    loss = (1 - eps) * w_y * ((ref - z_y.sum(0)) + log_s) + lse_square_scale * lse * lse
    if eps > 0:
        a_tot = a_sum.sum(0)  # = sum_j w_j = W (or C) once every class range is merged
        acc_tot = (acc + (_safe_ref(m) - ref) * a_sum).sum(0)
        loss = loss + eps / n_classes * (a_tot * log_s - acc_tot)
    nan = torch.full_like(loss, float("nan"))
    row_w = torch.where(bad, nan, torch.where(ok, w_y, torch.zeros_like(w_y)))
    loss = torch.where(bad, nan, torch.where(ok, loss, torch.zeros_like(loss)))
    return loss, lse, torch.stack([ref, log_s, row_w], dim=1)


def forward_impl(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
                 ignore_index: int, label_smoothing: float, lse_square_scale: float, softcap: float,
                 logit_scale: float, skip_ignored: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss, lse and the stats for backward: float32 (float64 for float64 inputs)."""
    part = forward_partials(x, w, b, target, weight, ignore_index, label_smoothing, softcap,
                            logit_scale, skip_ignored)
    loss, lse, stats = combine(part, target, weight, ignore_index, w.shape[0], label_smoothing,
                               lse_square_scale)
    cdt = _cdt(x)
    return loss.to(cdt), lse.to(cdt), stats


# ------------------------------------------------------------------------------------ backward
def backward_accumulate(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                        weight: Optional[Tensor], stats: Tensor, dloss: Tensor,
                        dlse: Optional[Tensor], ignore_index: int, label_smoothing: float,
                        lse_square_scale: float, softcap: float, logit_scale: float,
                        need_dx: bool, need_dw: bool, need_db: bool, class_offset: int = 0,
                        n_classes: Optional[int] = None, weight_total: Optional[Tensor] = None):
    """fp32 (fp64 for fp64) accumulators (dX (N, D), dW (C, D), db (C,)); None where not needed.

    For a vocabulary shard: ``weight`` holds this shard's class weights, ``stats`` the global ones,
    ``class_offset`` the shard's first class, ``n_classes`` the global C and ``weight_total`` the
    global sum of class weights (label smoothing); dX is then this shard's partial sum."""
    N, D = x.shape
    C = w.shape[0]
    n_classes = C if n_classes is None else n_classes
    cdt = _cdt(x)
    dx = torch.zeros((N, D), dtype=cdt, device=x.device) if need_dx else None
    dw = torch.zeros((C, D), dtype=cdt, device=x.device) if need_dw else None
    db = torch.zeros((C,), dtype=cdt, device=x.device) if need_db else None
    if not uses_triton(x):
        _backward_torch(x, w, b, target, weight, stats, dloss, dlse, ignore_index, label_smoothing,
                        lse_square_scale, softcap, logit_scale, dx, dw, db, class_offset, n_classes,
                        weight_total)
        return dx, dw, db
    if N == 0 or not (need_dx or need_dw or need_db):
        return dx, dw, db
    from .kernels.linear_cross_entropy import linear_xent_bwd_kernel

    _, cfg = launch.linear_configs(_bits(x), _kernel_operands(x, w, 128, 128)[2], w.shape[0])
    x, w, _ = _kernel_operands(x, w, cfg.block_n, cfg.block_v)
    if weight is None:
        wsum = x
    else:
        wsum = (weight_total if weight_total is not None else weight.sum()).to(torch.float32).reshape(1)
    h = dlse if dlse is not None else dloss
    grid = (triton.cdiv(N, cfg.block_n) * triton.cdiv(C, cfg.block_v),)
    linear_xent_bwd_kernel[grid](
        x, *x.stride(), w, *w.stride(), b if b is not None else x, weight if weight is not None else x,
        wsum, target, stats, dloss, dloss.stride(0), h, h.stride(0),
        dx if dx is not None else x, dw if dw is not None else x, db if db is not None else x,
        N, C, D, n_classes, class_offset, ignore_index,
        label_smoothing, lse_square_scale, softcap, logit_scale,
        HAS_BIAS=b is not None, HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0,
        HAS_SOFTCAP=softcap > 0, HAS_DLSE=dlse is not None, NEED_DX=need_dx, NEED_DW=need_dw,
        NEED_DB=need_db, GROUP_N=launch.LINEAR_GROUP_N, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
        BLOCK_D=cfg.block_d, DOT_PRECISION=launch.linear_dot_precision(_bits(x)),
        DOT_UPCAST=_dot_upcast(x), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dx, dw, db


def _backward_torch(x, w, b, target, weight, stats, dloss, dlse, ignore_index, eps, zl, softcap,
                    logit_scale, dx, dw, db, class_offset, n_classes, weight_total) -> None:
    """The backward kernel's math in chunked torch, accumulating into dx / dw / db (any None)."""
    N, C = x.shape[0], w.shape[0]
    cdt = _cdt(x)
    ref, log_s, row_w = (stats[:, i].to(cdt) for i in range(3))
    g = dloss.to(cdt)
    valid = target != ignore_index
    lse = ref + log_s
    coef_p = torch.where(valid, g * ((1 - eps) * row_w + 2 * zl * lse), torch.zeros_like(g))
    if eps > 0:
        if weight is None:
            wsum = n_classes
        else:
            wsum = (weight_total if weight_total is not None else weight.sum()).to(cdt)
        coef_p = coef_p + torch.where(valid, g * eps / n_classes * wsum, torch.zeros_like(g))
    if dlse is not None:
        coef_p = coef_p + dlse.to(cdt)
    active = valid | (dlse is not None)
    y_local = target - class_offset
    for r0 in range(0, N, ROW_CHUNK):
        r1 = min(N, r0 + ROW_CHUNK)
        xr = x[r0:r1].to(cdt)
        rs = slice(r0, r1)
        for c0 in range(0, C, COL_CHUNK):
            c1 = min(C, c0 + COL_CHUNK)
            z = _logits_torch(xr, w, b, c0, c1, softcap, logit_scale)
            dz = coef_p[rs, None] * torch.exp((z - ref[rs, None]) - log_s[rs, None])
            cols = torch.arange(c0, c1, device=x.device)
            hit = (cols[None, :] == y_local[rs, None]) & valid[rs, None]
            dz = dz - torch.where(hit, (g[rs] * (1 - eps) * row_w[rs])[:, None], torch.zeros_like(dz))
            if eps > 0:
                wc = weight[c0:c1].to(cdt)[None, :] if weight is not None else 1.0
                dz = dz - torch.where(valid[rs, None], (g[rs] * eps / n_classes)[:, None] * wc, torch.zeros_like(dz))
            dz = dz * logit_scale * ((1 - (z / softcap) ** 2) if softcap > 0 else 1.0)
            dz = torch.where(active[rs, None], dz, torch.zeros_like(dz))
            if dx is not None:
                dx[rs].add_(dz @ w[c0:c1].to(cdt))
            if dw is not None:
                dw[c0:c1].add_(dz.t() @ xr)
            if db is not None:
                db[c0:c1].add_(dz.sum(0))


def backward_impl(x, w, b, target, weight, stats, dloss, dlse, ignore_index, label_smoothing,
                  lse_square_scale, softcap, logit_scale, need_dx, need_dw, need_db):
    """(dX, dW, db) in the dtypes of x, w, b (None where not needed)."""
    dx, dw, db = backward_accumulate(x, w, b, target, weight, stats, dloss, dlse, ignore_index,
                                     label_smoothing, lse_square_scale, softcap, logit_scale,
                                     need_dx, need_dw, need_db)
    return (dx.to(x.dtype) if dx is not None else None, dw.to(w.dtype) if dw is not None else None,
            db.to(b.dtype) if db is not None else None)


# ---------------------------------------------------------------------------- custom op door
@torch.library.custom_op("xent_triton::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                             weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
                             lse_square_scale: float, softcap: float, logit_scale: float,
                             skip_ignored: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Custom-op form of ``forward_impl``."""
    return forward_impl(x, w, b, target, weight, ignore_index, label_smoothing, lse_square_scale,
                        softcap, logit_scale, skip_ignored)


@linear_cross_entropy_fwd.register_fake
def _(x, w, b, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap,
      logit_scale, skip_ignored):
    N = x.shape[0]
    return (x.new_empty((N,), dtype=_cdt(x)), x.new_empty((N,), dtype=_cdt(x)),
            x.new_empty((N, 3), dtype=_cdt(x)))


@torch.library.custom_op("xent_triton::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                             weight: Optional[Tensor], stats: Tensor, dloss: Tensor,
                             dlse: Optional[Tensor], ignore_index: int, label_smoothing: float,
                             lse_square_scale: float, softcap: float, logit_scale: float,
                             need_dx: bool, need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dW, db); a gradient that is not needed comes back as an empty (0,) tensor."""
    grads = backward_impl(x, w, b, target, weight, stats, dloss, dlse, ignore_index, label_smoothing,
                          lse_square_scale, softcap, logit_scale, need_dx, need_dw, need_db)
    return tuple(g if g is not None else x.new_empty((0,)) for g in grads)


@linear_cross_entropy_bwd.register_fake
def _(x, w, b, target, weight, stats, dloss, dlse, ignore_index, label_smoothing, lse_square_scale,
      softcap, logit_scale, need_dx, need_dw, need_db):
    return (x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
            w.new_empty(w.shape) if need_dw else x.new_empty((0,)),
            b.new_empty(b.shape) if need_db else x.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, w, b, target, weight, ignore_index, eps, zl, softcap, logit_scale, _skip = inputs
    ctx.save_for_backward(x, w, b, target, weight, output[2])
    ctx.hparams = (ignore_index, eps, zl, softcap, logit_scale)
    ctx.mark_non_differentiable(output[2])


def _grads(ctx, dloss, dlse, op: bool):
    x, w, b, target, weight, stats = ctx.saved_tensors
    if dloss is None:
        dloss = torch.zeros((), dtype=torch.float32, device=x.device).expand(stats.shape[0])
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
    if op:
        grads = torch.ops.xent_triton.linear_cross_entropy_bwd(x, w, b, target, weight, stats, dloss,
                                                               dlse, *ctx.hparams, *need)
    else:
        grads = backward_impl(x, w, b, target, weight, stats, dloss, dlse, *ctx.hparams, *need)
    dx, dw, db = (g if n else None for g, n in zip(grads, need))
    return (dx, dw, db) + (None,) * 8


def _backward(ctx, dloss, dlse, _dstats):
    return _grads(ctx, dloss, dlse, op=True)


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Eager autograd around ``forward_impl`` / ``backward_impl`` (same math as the custom ops)."""

    @staticmethod
    def forward(ctx, x, w, b, target, weight, ignore_index, label_smoothing, lse_square_scale,
                softcap, logit_scale, skip_ignored):
        out = forward_impl(x, w, b, target, weight, ignore_index, label_smoothing, lse_square_scale,
                           softcap, logit_scale, skip_ignored)
        _setup_context(ctx, (x, w, b, target, weight, ignore_index, label_smoothing,
                             lse_square_scale, softcap, logit_scale, skip_ignored), out)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, dloss, dlse, _dstats):
        return _grads(ctx, dloss, dlse, op=False)


def linear_cross_entropy_rows(*args):
    """(loss_rows, lse, stats) with autograd: custom ops under torch.compile, else the Function."""
    if _is_compiling():
        return torch.ops.xent_triton.linear_cross_entropy_fwd(*args)
    return LinearCrossEntropyFunction.apply(*args)
