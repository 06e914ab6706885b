"""Fused cross-entropy kernels: one streaming forward pass, one recomputing backward pass.

Math (per row; z = T(x) the transformed logits, lse = log sum_j e^{z_j}, p = softmax(z), w class
weights, W = sum_j w_j, eps the smoothing over ``n_classes``; derivation in docs/math.md)::

    hard y : loss = (1-eps) w_y (lse - z_y) + eps/C sum_j w_j (lse - z_j)          (0 if ignored)
             dL/dz_j = coef_p p_j - coef_y [j=y] - coef_u w_j     (formulas_triton.hard_target_coefficients)
    soft t : t' = (1-eps) t + eps/C, loss = sum_j w_j t'_j (lse - z_j)
             dL/dz_j = (g S + h) p_j - g w_j t'_j,  S = sum_j w_j t'_j

g_r is the loss's upstream gradient (already scaled by the reduction), h_r the lse's (the z-loss
reaches the kernels only through h: it is a function of the returned lse). dL/dx = dL/dz T'(x).

Grids and bytes (B bytes per logit, R rows): forward grid (R,), reads R*C*B once plus ~20 R;
backward grid (R, splits), recomputes p from the saved (ref, log s) and reads R*C*B, writes R*C*B
plus ~24 R. Forward + backward = 3x the logits' bytes for any upstream gradient (why recompute:
docs/design.md). Ignored rows read nothing in backward, nor in forward where no output needs them
(``SKIP_IGNORED``): with a fraction f ignored, (3 - 2f)x with a gradient, (1 - f)x without.
"""
import triton
import triton.language as tl

from ..core.formulas_triton import (
    LN2,
    entropy_argmax_update,
    entropy_from_sums,
    finish_hard_rows,
    hard_target_coefficients,
    hard_target_loss,
    online_lse_update,
    safe_ref,
    smoothed_target,
    soft_target_grad,
    softmax_from_stats,
    transform_grad,
    transform_logits,
    weight_total,
    weighted_sum_update,
)
from ..core.pointers_triton import row_pointer


@triton.jit
def stream_row(x_row, stride_xc, t_row, stride_tc, w_ptr, C, n_classes,
               label_smoothing, softcap, logit_scale,
               HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, SOFT_TARGET: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, BLOCK_C: tl.constexpr, STATS: tl.constexpr = False):
    """Stream one row of C logits once: returns (m, s, A, a_sum) with m the max, s = sum e^{z - ref},
    and (smoothing / soft targets only) A = sum_j a_j (z_j - ref), a_sum = sum_j a_j, where
    a_j = w_j t'_j (soft) or w_j (hard smoothing) and ref = safe_ref(m). Shared by every forward
    that needs row statistics (single device, or one vocabulary shard)."""
    offs = tl.arange(0, BLOCK_C)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    acc = tl.zeros((), tl.float32)
    a_sum = tl.zeros((), tl.float32)
    e = tl.zeros((), tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.zeros((), tl.int32)
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        mask = cols < C
        x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=mask, other=0.0)
        z = tl.where(mask, transform_logits(x, logit_scale, softcap, HAS_SOFTCAP), float("-inf"))
        s_old = s
        m, s, ref_old, ref_new = online_lse_update(m, s, z)
        if STATS:
            e, best, best_idx = entropy_argmax_update(e, best, best_idx, s_old, z, cols, ref_old, ref_new)
        if SOFT_TARGET or HAS_SMOOTHING:
            if SOFT_TARGET:
                a = tl.load(t_row + cols.to(tl.int64) * stride_tc, mask=mask, other=0.0).to(tl.float32)
                a = smoothed_target(a, label_smoothing, n_classes, HAS_SMOOTHING)
            else:
                a = tl.full((BLOCK_C,), 1.0, tl.float32)
            if HAS_WEIGHT:
                a = a * tl.load(w_ptr + cols, mask=mask, other=0.0)
            a = tl.where(mask, a, 0.0)
            acc, a_sum = weighted_sum_update(acc, a_sum, a, z, mask, ref_old, ref_new)
    return m, s, acc, a_sum, e, best_idx


@triton.jit
def cross_entropy_fwd_kernel(
    x_ptr, stride_xn, stride_xd, stride_xc,
    tgt_ptr, w_ptr, wsum_ptr,
    soft_ptr, stride_tn, stride_td, stride_tc,
    loss_ptr, lse_ptr, stats_ptr, ent_ptr, pred_ptr,
    C, D, n_classes, ignore_index,
    label_smoothing, softcap, logit_scale,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, SOFT_TARGET: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_C: tl.constexpr, STATS: tl.constexpr,
    SKIP_IGNORED: tl.constexpr = False,
):
    """Forward, one program per row, streaming the row once in BLOCK_C chunks (grid = (R,)).

    Writes loss_r (fp32, see module docstring), lse_r, and stats_r = (ref, log s, row weight) where
    the row weight is w_y for a valid hard target (0 if ignored, NaN if out of range) or S for a
    soft target. The ``mean`` denominator of a hard target is sum_r stats_r[2].
    Smoothing and soft targets keep A = sum_j a_j (z_j - ref), shifted when ref moves, so that
    sum_j a_j (lse - z_j) = (sum_j a_j) log s - A never subtracts two large numbers.
    SKIP_IGNORED (hard targets, no output needs an ignored row: no lse, no stats): an ignored row
    reads no logit and writes loss 0, lse 0, stats (0, 0, 0); valid rows are bitwise unchanged.
    """
    r = tl.program_id(0).to(tl.int64)
    x_row = row_pointer(x_ptr, r, D, stride_xn, stride_xd)
    if SOFT_TARGET:
        t_row = row_pointer(soft_ptr, r, D, stride_tn, stride_td)
    else:
        t_row = soft_ptr
    kept = r >= 0
    c_stream = C
    if not SOFT_TARGET:
        y = tl.load(tgt_ptr + r)
        if SKIP_IGNORED:
            kept = y != ignore_index
            c_stream = tl.where(kept, C, 0)  # a uniform scalar loop bound: 0 iterations if ignored
    m, s, acc, a_sum, e, best_idx = stream_row(x_row, stride_xc, t_row, stride_tc, w_ptr, c_stream, n_classes,
                                               label_smoothing, softcap, logit_scale, HAS_WEIGHT,
                                               HAS_SMOOTHING, SOFT_TARGET, HAS_SOFTCAP, BLOCK_C, STATS)
    ref = safe_ref(m)
    log_s = tl.where(kept, tl.log2(s) * LN2, 0.0)
    lse = ref + log_s
    if SOFT_TARGET:
        row_w = a_sum
        loss = a_sum * log_s - acc
    else:
        ok = (y != ignore_index) & (y >= 0) & (y < C)
        y_safe = tl.where(ok, y, 0)
        z_y = transform_logits(tl.load(x_row + y_safe * stride_xc), logit_scale, softcap, HAS_SOFTCAP)
        if HAS_WEIGHT:
            w_y = tl.load(w_ptr + y_safe)
        else:
            w_y = 1.0
        if HAS_SMOOTHING:
            smooth = weight_total(wsum_ptr, n_classes, HAS_WEIGHT) * log_s - acc
        else:
            smooth = 0.0
        loss = hard_target_loss((ref - z_y) + log_s, smooth, w_y, label_smoothing, n_classes, HAS_SMOOTHING)
        # an out-of-range target poisons its row (and so a mean) with NaN: no host sync needed
        loss, row_w = finish_hard_rows(loss, w_y, y, ignore_index, C)
    tl.store(loss_ptr + r, loss)
    tl.store(lse_ptr + r, lse)
    tl.store(stats_ptr + 3 * r, ref)
    tl.store(stats_ptr + 3 * r + 1, log_s)
    tl.store(stats_ptr + 3 * r + 2, row_w)
    if STATS:  # entropy of softmax(z) and the argmax, from the same pass
        tl.store(ent_ptr + r, entropy_from_sums(log_s, e, s))
        tl.store(pred_ptr + r, best_idx.to(tl.int64))


@triton.jit
def cross_entropy_bwd_kernel(
    x_ptr, stride_xn, stride_xd, stride_xc,
    dx_ptr, stride_gn, stride_gd, stride_gc,
    tgt_ptr, w_ptr, wsum_ptr,
    soft_ptr, stride_tn, stride_td, stride_tc,
    stats_ptr, dloss_ptr, stride_dloss, dlse_ptr, stride_dlse,
    dt_ptr, stride_dtn, stride_dtd, stride_dtc,
    C, D, n_classes, ignore_index, span,
    label_smoothing, softcap, logit_scale,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, SOFT_TARGET: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_C: tl.constexpr,
    SOFT_GRAD: tl.constexpr = False,
):
    """Backward, grid = (R, splits): program (r, k) recomputes p over columns [k*span, (k+1)*span)
    of row r, BLOCK_C at a time, from the saved (ref, log s), and writes dL/dx (formulas in the
    module docstring). ``span`` is a multiple of BLOCK_C; splits = 1 unless rows are too few to
    fill the GPU (launch policy). Per-row scalars are read once per program.

    dx may alias x (``inplace_backward``): each block is read before it is written.
    A hard-target row that is ignored (and has no lse gradient) reads no logits and writes zeros.
    SOFT_GRAD (a probability target that requires grad): also writes
    dL/dt_j = g (1-eps) w_j (lse - z_j) into dt, from the same pass (R*C*B' more bytes written).
    """
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    c_begin = tl.program_id(1) * span
    c_end = tl.minimum(c_begin + span, C)
    x_row = row_pointer(x_ptr, r, D, stride_xn, stride_xd)
    dx_row = row_pointer(dx_ptr, r, D, stride_gn, stride_gd)
    ref = tl.load(stats_ptr + 3 * r)
    log_s = tl.load(stats_ptr + 3 * r + 1)
    row_w = tl.load(stats_ptr + 3 * r + 2)
    g = tl.load(dloss_ptr + r * stride_dloss)
    if HAS_DLSE:
        h = tl.load(dlse_ptr + r * stride_dlse)
    else:
        h = 0.0
    if SOFT_TARGET:
        active = r >= 0  # every soft-target row takes part
        coef_p = g * row_w + h
    else:
        y = tl.load(tgt_ptr + r)
        valid = y != ignore_index
        if HAS_DLSE:
            active = r >= 0  # the lse gradient reaches ignored rows too
        else:
            active = valid
        coef_p, coef_y, coef_u = hard_target_coefficients(
            g, h, row_w, valid, label_smoothing, n_classes,
            weight_total(wsum_ptr, n_classes, HAS_WEIGHT), HAS_SMOOTHING)
    if SOFT_TARGET:
        t_row = row_pointer(soft_ptr, r, D, stride_tn, stride_td)
        if SOFT_GRAD:
            dt_row = row_pointer(dt_ptr, r, D, stride_dtn, stride_dtd)
    # (a block mask combined with a scalar flag by comparison: the interpreter mistypes `mask & flag`)
    c_active = tl.where(active, c_end, 0)
    for start in range(c_begin, c_end, BLOCK_C):
        cols = start + offs
        mask = cols < c_end
        lmask = cols < c_active
        x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=lmask, other=0.0)
        z = transform_logits(x, logit_scale, softcap, HAS_SOFTCAP)
        dz = coef_p * softmax_from_stats(z, ref, log_s)
        if SOFT_TARGET:
            a = tl.load(t_row + cols.to(tl.int64) * stride_tc, mask=lmask, other=0.0).to(tl.float32)
            if SOFT_GRAD:
                wt = soft_target_grad(g, z, ref, log_s, label_smoothing)
                if HAS_WEIGHT:
                    wt = wt * tl.load(w_ptr + cols, mask=lmask, other=0.0)
                tl.store(dt_row + cols.to(tl.int64) * stride_dtc, wt.to(dt_ptr.dtype.element_ty), mask=mask)
            a = smoothed_target(a, label_smoothing, n_classes, HAS_SMOOTHING)
            if HAS_WEIGHT:
                a = a * tl.load(w_ptr + cols, mask=lmask, other=0.0)
            dz -= g * a
        else:
            dz -= tl.where(cols == y, coef_y, 0.0)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    w = tl.load(w_ptr + cols, mask=cols < tl.where(valid, c_end, 0), other=0.0)
                else:
                    w = 1.0
                dz -= coef_u * w
        dx = transform_grad(dz, z, logit_scale, softcap, HAS_SOFTCAP)
        dx = tl.where(active, dx, 0.0)
        tl.store(dx_row + cols.to(tl.int64) * stride_gc, dx.to(dx_ptr.dtype.element_ty), mask=mask)
