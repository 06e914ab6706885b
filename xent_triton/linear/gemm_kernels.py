"""The logits GEMM with a fused epilogue: Z = T(X Wᵀ + b) in 16 bits, and fp32 row partials.

X (R, K) the (compacted) hidden states of a chunk, W (C, K) the classifier, b (C,) its bias, T the
logit transform of ``common.transform_logits`` (logit scaling, softcap). A persistent grid of
``num_progs`` programs walks the (M tiles × N tiles) of the product, grouped by GROUP_M row tiles
so that concurrent programs share W tiles in L2. An N tile is SUB_N sub-tiles of BLOCK_N classes,
done one after the other (fewer partials per logit at the dot tile the registers allow). Per
sub-tile: fp32 accumulation over K in BLOCK_K steps (``tl.dot``: tensor cores, ``wgmma`` on
sm_90), then the epilogue on the fp32 accumulator:

* the 16-bit logits tile ``z`` (R, C): T(X Wᵀ + b), or with SHIFTED the tile's z - ref (ref =
  safe_ref of the partial's m, SUB_N = 1), the fused head's chunk buffer (2 B per logit) that
  ``shifted_dz_kernel`` turns into dZ in place (rounding relative to |z - ref|: small where p is);
* per (row, N tile) the partials of ``xent_triton.core.partials`` in its layout, (S, R, 5) fp32 with
  S = cdiv(C, SUB_N·BLOCK_N), folded over the sub-tiles by the online LSE: m, s = Σ e^{z - ref},
  A = Σ a_j (z_j - ref), a_sum = Σ a_j (smoothing only, else 0) and z_y (the target's logit if
  this tile holds it, else 0), all from the fp32 accumulator: the loss keeps fp32 accuracy
  although the buffer is 16-bit.

The M extent is read from device memory (``count_ptr``: the compacted valid-token count, clamped
to R), so ignored tokens cost no FLOPs and no host sync; rows >= count are neither computed nor
written (their logits and partials stay as allocated: callers read only the first count rows).

The fused head's backward GEMMs take the same device count: ``dx_gemm_kernel`` (dX = s dZ W, row
extent = count, rows past it written as zeros) and ``dw_gemm_kernel`` (dW = s (acc + dZᵀ X),
reduction extent = count, + db). Both accumulate in fp32 and write once in the output's dtype.
"""
import triton
import triton.language as tl

from ..core.formulas_triton import (
    LOG2E,
    hard_target_coefficients,
    safe_ref,
    softmax_from_stats,
    transform_grad,
    transform_logits,
    weight_total,
)


@triton.jit
def logits_gemm_kernel(
    x_ptr, stride_xm, stride_xk, w_ptr, stride_wn, stride_wk, b_ptr, cw_ptr, tgt_ptr, count_ptr,
    z_ptr, stride_zm, stride_zn, part_ptr, R, C, K, class_offset, ignore_index, logit_scale,
    softcap, num_progs,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SUB_N: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_UPCAST: tl.constexpr, SHIFTED: tl.constexpr,
):
    """Persistent: program p handles tiles p, p + num_progs, ... of cdiv(count, BLOCK_M) x
    cdiv(C, BLOCK_N); ``num_progs`` is a runtime value (one binary for any grid)."""
    pid = tl.program_id(0)
    m_ext = tl.minimum(tl.load(count_ptr).to(tl.int32), R)  # device M extent: no host sync
    tiles_m = tl.cdiv(m_ext, BLOCK_M)
    tiles_n = tl.cdiv(C, SUB_N * BLOCK_N)  # a tile: BLOCK_M rows x SUB_N sub-tiles of BLOCK_N classes
    total = tiles_m * tiles_n
    in_group = GROUP_M * tiles_n
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in range(pid, total, num_progs):
        group = tile // in_group
        first_m = group * GROUP_M
        size_m = tl.minimum(tiles_m - first_m, GROUP_M)
        tm = first_m + (tile % in_group) % size_m
        tn = (tile % in_group) // size_m
        rows = tm * BLOCK_M + offs_m
        rmask = rows < m_ext
        x_blk = x_ptr + tl.cast(tm, tl.int64) * BLOCK_M * stride_xm
        y = tl.load(tgt_ptr + rows, mask=rmask, other=ignore_index)
        y_col = y - class_offset
        y_col = tl.where((y != ignore_index) & (y_col >= 0) & (y_col < C), y_col, -1)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_M,), tl.float32)
        z_y = tl.zeros((BLOCK_M,), tl.float32)
        a_acc = tl.zeros((BLOCK_M,), tl.float32)
        a_sum = tl.zeros((BLOCK_M,), tl.float32)
        c_first = tn * (SUB_N * BLOCK_N)
        for j in range(0, tl.minimum(SUB_N, tl.cdiv(C - c_first, BLOCK_N))):
            c0 = c_first + j * BLOCK_N
            cols = c0 + offs_n
            cmask = cols < C
            w_blk = w_ptr + tl.cast(c0, tl.int64) * stride_wn
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                kmask = kk < K
                xb = tl.load(x_blk + (offs_m[:, None] * stride_xm + kk[None, :] * stride_xk),
                             mask=rmask[:, None] & kmask[None, :], other=0.0)
                wt = tl.load(w_blk + (kk[:, None] * stride_wk + offs_n[None, :] * stride_wn),
                             mask=kmask[:, None] & cmask[None, :], other=0.0)
                if DOT_UPCAST:  # CPU interpreter only: its bf16 dot multiplies raw bits
                    xb = xb.to(tl.float32)
                    wt = wt.to(tl.float32)
                acc = tl.dot(xb, wt, acc)
            if HAS_BIAS:
                acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            z = transform_logits(acc, logit_scale, softcap, HAS_SOFTCAP)
            z = tl.where(cmask[None, :], z, float("-inf"))
            z_out = z_ptr + tl.cast(rows, tl.int64)[:, None] * stride_zm + cols[None, :] * stride_zn
            m_new = tl.maximum(m, tl.max(z, 1))
            ref_new = safe_ref(m_new)
            if SHIFTED:  # z - ref of the tile (SUB_N = 1: the partial's own m): shifted_dz_kernel
                tl.store(z_out, (z - ref_new[:, None]).to(z_ptr.dtype.element_ty),
                         mask=rmask[:, None] & cmask[None, :])
            else:
                tl.store(z_out, z.to(z_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
            # fold this sub-tile into the row partials, from the fp32 accumulator (online LSE)
            ref_old = safe_ref(m)
            s = s * tl.exp2((ref_old - ref_new) * LOG2E) + \
                tl.sum(tl.exp2((z - ref_new[:, None]) * LOG2E), 1)
            m = m_new
            z_y += tl.sum(tl.where(cols[None, :] == y_col[:, None], z, 0.0), 1)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    a = tl.load(cw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                else:
                    a = tl.where(cmask, 1.0, 0.0)
                a_acc = a_acc + (ref_old - ref_new) * a_sum + \
                    tl.sum(a[None, :] * tl.where(cmask[None, :], z - ref_new[:, None], 0.0), 1)
                a_sum += tl.sum(a, 0)
        out = part_ptr + (tl.cast(tn, tl.int64) * R + rows) * 5  # (S, R, 5): see xent_triton.core.partials
        tl.store(out, m, mask=rmask)
        tl.store(out + 1, s, mask=rmask)
        tl.store(out + 2, a_acc, mask=rmask)
        tl.store(out + 3, a_sum, mask=rmask)
        tl.store(out + 4, z_y, mask=rmask)


@triton.jit
def shifted_dz_kernel(
    z_ptr, stride_zm, part_ptr, stats_ptr, tgt_ptr, w_ptr, wsum_ptr, R, C, class_offset,
    ignore_index, label_smoothing, softcap, logit_scale,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dL/dx in place over the SHIFTED buffer, grid (R, S): program (r, t) rewrites row r's class
    tile t, which holds z - ref_t in 16 bits (ref_t = safe_ref of the tile's partial m), as
    dL/dx for an upstream gradient of 1 (``linear/chunk_kernels.py``'s formulas; stats = (ref,
    log s, row weight) from ``combine``). z - ref = stored + (ref_t - ref): the rounding of the
    buffer is relative to |z - ref_t|, small where p is large. Ignored rows: neither read nor
    written (the fused head's dX / dW GEMMs stop at the kept-row count; in its compacted order the
    ignored rows are the last ones)."""
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    y = tl.load(tgt_ptr + r)
    valid = y != ignore_index
    ref = tl.load(stats_ptr + 3 * r)
    log_s = tl.load(stats_ptr + 3 * r + 1)
    row_w = tl.load(stats_ptr + 3 * r + 2)
    coef_p, coef_y, coef_u = hard_target_coefficients(
        1.0, 0.0, row_w, valid, label_smoothing, C, weight_total(wsum_ptr, C, HAS_WEIGHT),
        HAS_SMOOTHING)
    shift = safe_ref(tl.load(part_ptr + (t * R + r) * 5)) - ref
    cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
    c_active = tl.where(valid, C, 0)  # a block mask from a scalar flag by comparison (interpreter)
    z_row = z_ptr + r * stride_zm
    zs = tl.load(z_row + cols, mask=cols < c_active, other=0.0).to(tl.float32)
    zr = zs + shift  # z - ref
    dz = coef_p * softmax_from_stats(zr, 0.0, log_s)  # p = exp((z - ref) - log s) of the shifted row
    dz -= tl.where(cols == y - class_offset, coef_y, 0.0)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            dz -= coef_u * tl.load(w_ptr + cols, mask=cols < c_active, other=0.0)
        else:
            dz -= coef_u
    dx = transform_grad(dz, zr + ref, logit_scale, softcap, HAS_SOFTCAP)
    tl.store(z_row + cols, dx.to(z_row.dtype.element_ty), mask=cols < c_active)


@triton.jit
def _rne_bf16(v):
    """fp32 v rounded to the nearest bf16 (ties to even), still fp32: the CPU interpreter's
    fp32 -> bf16 cast truncates, CUDA's rounds to nearest; applied first, the truncation is exact."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _grouped_tile(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(tm, tn) of program pid over a tiles_m x tiles_n grid, GROUP_M row tiles at a time (the
    programs running together share their B tiles in L2)."""
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@triton.jit
def dx_gemm_kernel(
    a_ptr, stride_am, stride_ak, b_ptr, stride_bk, stride_bn, out_ptr, stride_om, stride_on,
    count_ptr, scale_ptr, M, N, K,
    HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_UPCAST: tl.constexpr, OUT_RNE: tl.constexpr,
):
    """out (M, N) = s · A (M, K) B (K, N) with a device M extent: rows < count (``count_ptr``,
    clamped to M) are computed, rows in [count, M) are written as zeros (no loads, no tl.dot for a
    tile past the count). The fused head's dX = dZ W (A = the 16-bit dZ chunk, B = W). fp32
    accumulation; s = *scale_ptr (HAS_SCALE) on the accumulator; one write in out's dtype."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tm, tn = _grouped_tile(tl.program_id(0), tiles_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    m_ext = tl.minimum(tl.load(count_ptr).to(tl.int32), M)  # device M extent: no host sync
    rows = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rmask = rows < m_ext
    cmask = cols < N
    a_blk = a_ptr + tl.cast(tm, tl.int64) * BLOCK_M * stride_am + \
        (tl.arange(0, BLOCK_M)[:, None] * stride_am + offs_k[None, :] * stride_ak)
    b_blk = b_ptr + tl.cast(tn, tl.int64) * BLOCK_N * stride_bn + \
        (offs_k[:, None] * stride_bk + tl.arange(0, BLOCK_N)[None, :] * stride_bn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    k_ext = tl.where(tm * BLOCK_M < m_ext, K, 0)  # a tile past the count: no K loop, zeros
    for k0 in range(0, k_ext, BLOCK_K):
        kmask = k0 + offs_k < K
        a = tl.load(a_blk, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_blk, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if DOT_UPCAST:  # CPU interpreter only: its bf16 dot multiplies raw bits
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_blk += BLOCK_K * stride_ak
        b_blk += BLOCK_K * stride_bk
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr).to(tl.float32)
    if OUT_RNE:  # CPU interpreter, bf16 out only (launcher)
        acc = _rne_bf16(acc)
    out = out_ptr + tl.cast(rows, tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & cmask[None, :])


@triton.jit
def dw_gemm_kernel(
    a_ptr, stride_ak, stride_am, b_ptr, stride_bk, stride_bn, out_ptr, stride_om, stride_on,
    acc_ptr, db_ptr, count_ptr, scale_ptr, M, N, K,
    HAS_ACC: tl.constexpr, HAS_DB: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_UPCAST: tl.constexpr,
    OUT_RNE: tl.constexpr,
):
    """out (M, N) = s · (acc + Aᵀ B) with A (K, M), B (K, N) and a device reduction extent: only
    the first count (``count_ptr``, clamped to K) rows of A and B are read. The fused head's dW =
    dZᵀ X (A = the 16-bit dZ chunk, M = C classes; B = the compacted X, N = D). fp32 accumulation
    in the GEMM; HAS_ACC adds the fp32 (M, N) ``acc_ptr`` (earlier chunks; out's strides); s = *scale_ptr
    (HAS_SCALE); one write in out's dtype (fp32 for an intermediate chunk, the parameter dtype for
    the last). HAS_DB: db (M,) fp32 (+)= Σ_k A[k, :] over the same rows, written by the tn = 0
    programs (the bias gradient from the tiles the GEMM loads anyway)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tm, tn = _grouped_tile(tl.program_id(0), tiles_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    k_ext = tl.minimum(tl.load(count_ptr).to(tl.int32), K)  # device K extent: no host sync
    rows = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rmask = rows < M
    cmask = cols < N
    a_blk = a_ptr + tl.cast(tm, tl.int64) * BLOCK_M * stride_am + \
        (tl.arange(0, BLOCK_M)[:, None] * stride_am + offs_k[None, :] * stride_ak)
    b_blk = b_ptr + tl.cast(tn, tl.int64) * BLOCK_N * stride_bn + \
        (offs_k[:, None] * stride_bk + tl.arange(0, BLOCK_N)[None, :] * stride_bn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    db = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, k_ext, BLOCK_K):
        kmask = k0 + offs_k < k_ext
        a = tl.load(a_blk, mask=rmask[:, None] & kmask[None, :], other=0.0)  # Aᵀ tile (M, K)
        b = tl.load(b_blk, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if HAS_DB:
            db += tl.sum(a.to(tl.float32), 1)
        if DOT_UPCAST:  # CPU interpreter only: its bf16 dot multiplies raw bits
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_blk += BLOCK_K * stride_ak
        b_blk += BLOCK_K * stride_bk
    offs = tl.cast(rows, tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    omask = rmask[:, None] & cmask[None, :]
    if HAS_ACC:
        acc += tl.load(acc_ptr + offs, mask=omask, other=0.0)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr).to(tl.float32)
    if OUT_RNE:  # CPU interpreter, bf16 out only (launcher)
        acc = _rne_bf16(acc)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=omask)
    if HAS_DB:
        dbmask = rows < tl.where(tn == 0, M, 0)  # a block mask from a scalar by comparison
        if HAS_ACC:
            db += tl.load(db_ptr + rows, mask=dbmask, other=0.0)
        tl.store(db_ptr + rows, db, mask=dbmask)
