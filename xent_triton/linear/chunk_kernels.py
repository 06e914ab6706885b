"""In-place softmax-gradient kernels over a logits chunk formed by a vendor GEMM (linear head).

The chunked linear head (``xent_triton/linear/chunked.py``) writes raw logits x = X_c Wᵀ (+ b) of a
chunk of rows, in fp32, into one reused (rows, C_s) buffer; these kernels write dL/dx in the
operands' dtype into ``dz`` (the same buffer for fp32 operands: in place; a reused 16-bit buffer
otherwise), so the three GEMMs (logits, dX = dZ W, dW += dZᵀ X) stay on cuBLAS and the loss sees
fp32-accurate logits (bf16 logits would round |z| ~ 60 by 0.25).

Math (the core kernels' formulas, ``cross_entropy/kernels.py``; z = T(x) the transformed logits)::

    loss = (1-eps) w_y (lse - z_y) + eps/C sum_j w_j (lse - z_j)          (0 if ignored)
    dL/dz_j = coef_p p_j - coef_y [j=y] - coef_u w_j   (formulas_triton.hard_target_coefficients)
    dL/dx_j = dL/dz_j T'(x_j)

* ``chunk_loss_grad_kernel`` (grid (rows,)): one row per program over all C classes. Pass 1
  streams the row for (m, s, A) (online log-sum-exp) and z_y from the SAME buffer (so loss >= 0
  whatever rounding the GEMM applied), writes loss, lse, stats = (ref, log s, row weight). Pass 2
  re-reads the row and writes dL/dx for the upstream gradient g = 1 or the row's token weight
  (``HAS_TOKEN_WEIGHT``; the reduction's
  1/denominator is applied later, on the much smaller dX / dW), plus the z-loss term folded in as
  an lse gradient h = zcoef * g * lse (``HAS_ZLOSS``; zcoef a device scalar). ``STATS`` adds
  the entropy log s - E / s (E = sum_j e^{z_j - ref} (z_j - ref), kept by the same online update)
  and the argmax per row, from pass 1: no extra read (ignored rows are then read once too).
  Ignored rows otherwise read nothing; they write zeros. Bytes: 2 reads + 1 write of the row
  (fp32 logits and 16-bit dZ: 10 B per logit; fp32: 12) + ~24 B per row (+12 with STATS).
* ``chunk_grad_kernel`` (grid (rows,)): the recompute backward of one vocabulary split
  [class_offset, class_offset + C_s): reads the saved stats and per-row upstream gradients
  (g, h), overwrites the split's row with dL/dx. Bytes: 1 read + 1 write of the split.
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
    softmax_from_stats,
    transform_grad,
    transform_logits,
    weight_total,
    weighted_sum_update,
)


@triton.jit
def grad_pass(z_row, dz_row, C, y_local, active, valid, coef_p, coef_y, coef_u, ref, log_s, w_ptr,
              softcap, logit_scale, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, BLOCK_C: tl.constexpr):
    """dL/dx of the C logits at z_row into dz_row (unit strides; the same row for an in-place
    pass); inactive rows: zeros, no reads."""
    offs = tl.arange(0, BLOCK_C)
    # a block mask combined with a scalar flag by comparison (the interpreter mistypes `mask & flag`)
    c_active = tl.where(active, C, 0)
    c_weight = tl.where(valid, C, 0)
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        mask = cols < C
        x = tl.load(z_row + cols, mask=cols < c_active, other=0.0)
        z = transform_logits(x, logit_scale, softcap, HAS_SOFTCAP)
        dz = coef_p * softmax_from_stats(z, ref, log_s)
        dz -= tl.where(cols == y_local, coef_y, 0.0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols, mask=cols < c_weight, other=0.0)
            else:
                w = 1.0
            dz -= coef_u * w
        dx = transform_grad(dz, z, logit_scale, softcap, HAS_SOFTCAP)
        dx = tl.where(active, dx, 0.0)
        tl.store(dz_row + cols, dx.to(dz_row.dtype.element_ty), mask=mask)


@triton.jit
def chunk_loss_grad_kernel(
    z_ptr, stride_zr, dz_ptr, stride_dzr, tgt_ptr, w_ptr, wsum_ptr, zcoef_ptr, tw_ptr,
    loss_ptr, lse_ptr, stats_ptr, ent_ptr, pred_ptr,
    C, n_classes, ignore_index,
    label_smoothing, softcap, logit_scale,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, HAS_TOKEN_WEIGHT: tl.constexpr, STATS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Forward + gradient of one row of a (rows, C) logits chunk, in place (module docstring).

    Writes loss_r, lse_r (0 for ignored rows) and stats_r = (ref, log s, row weight) with the
    row weight w_y (0 ignored, NaN for an out-of-range id: its loss and gradients become NaN).
    ``HAS_TOKEN_WEIGHT``: the row's upstream gradient is its token weight tw_r (loss and z-loss
    gradient both scaled by it; the loss written stays unweighted). ``STATS``: also the entropy
    of softmax(z) and the argmax (int64) of every row, ignored ones included, from pass 1."""
    r = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + r * stride_zr
    offs = tl.arange(0, BLOCK_C)
    y = tl.load(tgt_ptr + r)
    valid = y != ignore_index
    ok = valid & (y >= 0) & (y < C)
    y_safe = tl.where(ok, y, 0)
    if STATS:
        c_valid = C  # the stats cover ignored rows too (the core's ``predicted``)
    else:
        c_valid = tl.where(valid, C, 0)
    m = tl.full((), float("-inf"), tl.float32)
    e = tl.zeros((), tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.zeros((), tl.int32)
    s = tl.zeros((), tl.float32)
    acc = tl.zeros((), tl.float32)
    a_sum = tl.zeros((), tl.float32)
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        lmask = cols < c_valid
        x = tl.load(z_row + cols, mask=lmask, other=0.0)
        z = tl.where(lmask, transform_logits(x, logit_scale, softcap, HAS_SOFTCAP), float("-inf"))
        s_old = s
        m, s, ref_old, ref_new = online_lse_update(m, s, z)
        if STATS:
            e, best, best_idx = entropy_argmax_update(e, best, best_idx, s_old, z, cols, ref_old, ref_new)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                a = tl.load(w_ptr + cols, mask=lmask, other=0.0)
            else:
                a = tl.where(lmask, 1.0, 0.0)
            acc, a_sum = weighted_sum_update(acc, a_sum, a, z, lmask, ref_old, ref_new)
    if STATS:
        tl.store(ent_ptr + r, entropy_from_sums(tl.log2(s) * LN2, e, s))
        tl.store(pred_ptr + r, best_idx.to(tl.int64))
    ref = tl.where(valid, safe_ref(m), 0.0)
    log_s = tl.log2(tl.where(valid, s, 1.0)) * LN2  # ignored rows (read nothing without STATS): 0
    lse = ref + log_s
    z_y = transform_logits(tl.load(z_row + y_safe), logit_scale, softcap, HAS_SOFTCAP)
    if HAS_WEIGHT:
        w_y = tl.load(w_ptr + y_safe)
    else:
        w_y = 1.0
    w_total = weight_total(wsum_ptr, n_classes, HAS_WEIGHT)
    loss = hard_target_loss((ref - z_y) + log_s, w_total * log_s - acc, w_y, label_smoothing, n_classes,
                            HAS_SMOOTHING)
    loss, row_w = finish_hard_rows(loss, w_y, y, ignore_index, C)
    lse = tl.where(valid, lse, 0.0)
    tl.store(loss_ptr + r, loss)
    tl.store(lse_ptr + r, lse)
    tl.store(stats_ptr + 3 * r, ref)
    tl.store(stats_ptr + 3 * r + 1, log_s)
    tl.store(stats_ptr + 3 * r + 2, row_w)
    if HAS_TOKEN_WEIGHT:
        g = tl.load(tw_ptr + r).to(tl.float32)
    else:
        g = 1.0
    if HAS_ZLOSS:
        h = tl.where(valid, tl.load(zcoef_ptr) * g * lse, 0.0)
    else:
        h = 0.0
    coef_p, coef_y, coef_u = hard_target_coefficients(g, h, row_w, valid, label_smoothing, n_classes,
                                                      w_total, HAS_SMOOTHING)
    grad_pass(z_row, dz_ptr + r * stride_dzr, C, y_safe, valid, valid, coef_p, coef_y, coef_u, ref, log_s,
              w_ptr, softcap,
              logit_scale, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, BLOCK_C)


@triton.jit
def chunk_grad_kernel(
    z_ptr, stride_zr, dz_ptr, stride_dzr, tgt_ptr, w_ptr, wsum_ptr, stats_ptr,
    dloss_ptr, stride_dloss, dlse_ptr, stride_dlse,
    C, n_classes, class_offset, ignore_index,
    label_smoothing, softcap, logit_scale,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_DLSE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dL/dx of one row of a vocabulary split (classes [class_offset, class_offset + C)) from the
    saved stats (ref, log s, row weight), the loss's upstream gradient g_r and the lse's h_r, in
    place. ``w_ptr`` points at the split's class weights, ``wsum_ptr`` at the global sum."""
    r = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + r * stride_zr
    ref = tl.load(stats_ptr + 3 * r)
    log_s = tl.load(stats_ptr + 3 * r + 1)
    log_s = tl.where(log_s == float("-inf"), 0.0, log_s)  # a skipped (ignored) row: p = 0 x coef_p
    row_w = tl.load(stats_ptr + 3 * r + 2)
    g = tl.load(dloss_ptr + r * stride_dloss)
    if HAS_DLSE:
        h = tl.load(dlse_ptr + r * stride_dlse)
    else:
        h = 0.0
    y = tl.load(tgt_ptr + r)
    valid = y != ignore_index
    if HAS_DLSE:
        active = r >= 0  # the lse gradient reaches ignored rows too
    else:
        active = valid
    coef_p, coef_y, coef_u = hard_target_coefficients(
        g, h, row_w, valid, label_smoothing, n_classes, weight_total(wsum_ptr, n_classes, HAS_WEIGHT),
        HAS_SMOOTHING)
    grad_pass(z_row, dz_ptr + r * stride_dzr, C, y - class_offset, active, valid, coef_p, coef_y, coef_u,
              ref, log_s, w_ptr,
              softcap, logit_scale, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, BLOCK_C)
