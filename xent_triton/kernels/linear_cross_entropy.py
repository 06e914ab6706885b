"""Fused linear cross-entropy: z = T(X Wᵀ + b), softmax, loss and gradients, tile by tile in SRAM.

X (N, D) hidden states, W (C, D) the classifier, b (C,) its bias. The N×C logits never exist in
memory: every kernel forms (BLOCK_N rows × BLOCK_V classes) logit tiles in registers (fp32
tensor-core accumulation over D in BLOCK_D steps), viewed transposed (classes on axis 0, exactly
like the 1-D row blocks of the core kernels) and folded into per-row statistics by the shared
online log-sum-exp of ``common.py``, unchanged. Loss and gradient formulas are those of
``kernels/cross_entropy.py``'s docstring (hard targets); ``linear_ops.combine`` assembles the loss.

Algorithm (FLOPs counted as 2·M·N·K per dot; P = N·D·C):

* forward ``linear_xent_fwd_kernel``, 1-D grid of (class split × row block) programs: each sweeps
  its span of class tiles and writes per-row *partials* (m, s, A, a_sum, z_y) of its span: 2P.
  z_y is selected from the same logit tile the softmax uses (one value of z, whatever the dot
  precision: TF32 included).
  ``combine`` (torch, O(N·splits)) merges the partials into loss, lse and the (ref, log s, w_y)
  stats the core saves. A vocabulary shard (``class_offset``, global ``n_classes``) produces the
  same partials, merged across ranks by the same combine: the tensor-parallel door.
* backward ``linear_xent_bwd_kernel``, one program per (row block, class tile) pair in GEMM-swizzled
  groups: recompute the tile (2·BN·BV·D), form dL/dz from the saved stats (any upstream g_r and
  lse gradient h_r: nothing is formed in forward, so no rescaling pass), then per D chunk
  dX[rows] += dz·W[tile] and dW[tile] += dzᵀ·X[rows] (2·BN·BV·D each), added with relaxed fp32
  ``atomic_add`` into fp32 accumulators (db[tile] += Σ_rows dz likewise): 6P.
* total 8P = 4.0 × the 2P of the logits GEMM (exactly, on tile-aligned shapes; traffic counts
  padded tiles in full) and 1.33 × the 6P of F.linear + cross-entropy + two gradient GEMMs, which
  materialise the logits. Without logits the lse must exist before any gradient term (forward 2P)
  and backward needs the tile again (2P) besides dX and dW (4P); one kernel per gradient = 10P.

Choices:

* fp32 accumulation of dX, dW, db (never bf16 across class/row chunks: a known convergence bug);
  the final cast to the parameter's dtype happens once. Atomics make the gradients
  non-deterministic at the fp32 rounding level (the order of C/BLOCK_V resp. N/BLOCK_N fp32
  additions, ~1e-7 relative; invisible after a cast to bf16 / fp16). "Ownership" (one program per
  row block over all C, dX read-modify-write) moves the same bytes with N/BLOCK_N programs only.
* ignored tokens: a row block without an active row (ignored, no lse gradient) runs zero iterations
  of its loops (a uniform scalar bound, no host sync); inactive rows of mixed blocks are masked out
  of the atomics. The forward skips all-ignored row blocks unless the lse is returned. Padding
  packed at the end of sequences is skipped for free.
* tiles (``launch.py``): 64 × 128 × 64 (bf16 / fp16), 8 warps; 128 × 128 tiles reach the register
  limit with every flag (spills), see the launch notes and the static report.

Budget, Llama-3-8B head: N = 8192 tokens, D = 4096, C = 128256, bf16; H100 SXM 990 TFLOP/s dense
bf16, 3.35 TB/s HBM (H200: same FLOPs, 4.8 TB/s); 50 MB L2:

* FLOPs 8P = 34.4 PFLOP: 34.8 ms at peak (forward 8.7, backward 26.1); F.linear + CE: 6P = 26.1.
* HBM bytes (GEMM-swizzled orders keep the running X rows, W tiles and accumulators in L2): X
  0.07 GB and W 1.05 GB read about once per pass; the dW accumulator (C·D·4 = 2.1 GB)
  read-modified-written once per group of 16 row blocks: 33.6 GB (10.0 ms at 3.35 TB/s, 7.0 ms on
  an H200), dX 0.27 GB: under the compute time on both, if overlapped.
* on-chip traffic is the bound of this tile size: operand tiles L2→SM (BN + BV)·D·2 bytes per
  2·BN·BV·D FLOPs = 1 byte per 42.7 FLOPs (202 GB forward, 403 GB backward, which streams both
  operands twice) and fp32 atomics 4·(BN + BV)·D bytes per 6·BN·BV·D FLOPs = 1 per 64 FLOPs
  (403 GB, resolved in L2). At an assumed 8-10 TB/s of L2 throughput (not measured here; no GPU)
  that is ~20-25 ms forward and ~80-100 ms backward, i.e. ~3x the compute floor: this design
  trades time for memory. Larger tiles (128 × 256 via warp specialisation / 2-CTA MMA), or a
  filter skipping tiles of negligible softmax (as Cut Cross-Entropy does), are the ways down.
* memory beyond inputs and outputs: partials 20 bytes × splits (16) per row, stats 12 bytes per
  row, the fp32 accumulators dX 4·N·D (0.13 GB) and dW 4·C·D (2.1 GB, freed after the cast); no
  N×C buffer. Eager F.linear + F.cross_entropy keep the bf16 logits and log-probabilities (2.1 GB
  each) for backward and add their gradients (2.1 GB each) in it.
"""
import triton
import triton.language as tl

from .common import (
    hard_target_coefficients,
    online_lse_update,
    softmax_from_stats,
    transform_grad,
    transform_logits,
    weight_total,
)


@triton.jit
def _logit_tile(x_ptr, stride_xn, stride_xd, w_ptr, stride_wc, stride_wd, b_ptr,
                row0, n_rows, col0, n_cols, d_end, logit_scale, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """zᵀ = T(W[cols] X[rows]ᵀ + b[cols]) as a (BLOCK_V, BLOCK_N) fp32 tile for rows row0 + i
    (i < n_rows) and classes col0 + j (j < n_cols), summing D in BLOCK_D steps up to ``d_end``
    (D, or 0 to skip the work). Lanes outside hold finite junk (callers mask them).

    Register budget (the kernels' tight spot): the product is formed as X Wᵀ, rows on the MMA's
    M axis where a thread holds 2 rows of each 16, and returned transposed (a layout permutation,
    no data movement), so per-row statistics reduced over classes cost 2 registers each instead of
    BLOCK_N / 2; addresses are int32 offsets from scalar int64 block bases (the host guarantees
    in-block offsets < 2**31), half the registers of 64-bit pointer tensors."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = offs_n < n_rows
    cmask = offs_v < n_cols
    x_blk = x_ptr + row0 * stride_xn
    w_blk = w_ptr + tl.cast(col0, tl.int64) * stride_wc
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, d_end, BLOCK_D):
        dd = d0 + offs_d
        dmask = dd < d_end
        xb = tl.load(x_blk + (offs_n[:, None] * stride_xn + dd[None, :] * stride_xd),
                     mask=rmask[:, None] & dmask[None, :], other=0.0)
        wt = tl.load(w_blk + (dd[:, None] * stride_wd + offs_v[None, :] * stride_wc),
                     mask=dmask[:, None] & cmask[None, :], other=0.0)
        if DOT_UPCAST:  # CPU interpreter only: its bf16 dot multiplies raw bits; fp32 copies give
            xb = xb.to(tl.float32)  # the exact products the tensor cores form
            wt = wt.to(tl.float32)
        acc = tl.dot(xb, wt, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + col0 + offs_v, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return tl.trans(transform_logits(acc, logit_scale, softcap, HAS_SOFTCAP))


@triton.jit
def linear_xent_fwd_kernel(
    x_ptr, stride_xn, stride_xd, w_ptr, stride_wc, stride_wd, b_ptr, cw_ptr, tgt_ptr, part_ptr,
    N, C, D, class_offset, ignore_index, n_splits, tiles_per_split, logit_scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, SKIP_IGNORED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Forward partials, 1-D grid of n_splits x cdiv(N, BLOCK_N) programs, the split fastest:
    program k + n_splits·i streams class tiles
    [k·tiles_per_split, (k+1)·tiles_per_split) for rows [i·BLOCK_N, (i+1)·BLOCK_N) and writes, per
    row, into part (splits, N, 5) fp32: m (max z), s = Σ e^{z - ref}, A = Σ a_j (z_j - ref),
    a_sum = Σ a_j (a_j = w_j or 1; smoothing only, else 0) and z_y (0 unless y is in the span),
    with ref = safe_ref(m). Columns are local to this weight (a vocabulary shard starts at global
    class ``class_offset``). SKIP_IGNORED: a row block with no non-ignored target does no work."""
    pid = tl.program_id(0)
    split = pid % n_splits  # fastest: concurrent programs share X row blocks in L2
    row0 = (pid // n_splits).to(tl.int64) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    rmask = rows < N
    y = tl.load(tgt_ptr + rows, mask=rmask, other=ignore_index)
    c_begin = split * tiles_per_split * BLOCK_V
    c_end = tl.minimum(c_begin + tiles_per_split * BLOCK_V, C)
    if SKIP_IGNORED:
        any_valid = tl.max((y != ignore_index).to(tl.int32), 0)
        c_end = tl.where(any_valid > 0, c_end, c_begin)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    a_sum = tl.zeros((), tl.float32)
    z_y = tl.zeros((BLOCK_N,), tl.float32)
    y_col = y - class_offset  # the target's column in this weight, or -1 when it holds none
    y_col = tl.where((y != ignore_index) & (y_col >= 0) & (y_col < C), y_col, -1)
    offs_v = tl.arange(0, BLOCK_V)
    for c0 in range(c_begin, c_end, BLOCK_V):
        cmask = c0 + offs_v < C
        z = _logit_tile(x_ptr, stride_xn, stride_xd, w_ptr, stride_wc, stride_wd, b_ptr,
                        row0, N - row0, c0, C - c0, D, logit_scale, softcap,
                        HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_UPCAST)
        z = tl.where(cmask[:, None], z, float("-inf"))
        # z_y from the very tile the softmax uses (same dot precision, e.g. TF32): a one-hot select
        z_y += tl.sum(tl.where((c0 + offs_v)[:, None] == y_col[None, :], z, 0.0), 0)
        m, s, ref_old, ref_new = online_lse_update(m, s, z)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                a = tl.load(cw_ptr + c0 + offs_v, mask=cmask, other=0.0)
            else:
                a = tl.where(cmask, 1.0, 0.0)
            acc = acc + (ref_old - ref_new) * a_sum + \
                tl.sum(a[:, None] * tl.where(cmask[:, None], z - ref_new[None, :], 0.0), 0)
            a_sum = a_sum + tl.sum(a, 0)
    out = part_ptr + (split * N + rows) * 5  # partials layout (splits, N, 5): see xent_triton.partials
    tl.store(out, m, mask=rmask)
    tl.store(out + 1, s, mask=rmask)
    tl.store(out + 2, acc, mask=rmask)
    tl.store(out + 3, tl.zeros((BLOCK_N,), tl.float32) + a_sum, mask=rmask)
    tl.store(out + 4, z_y, mask=rmask)


@triton.jit
def linear_xent_bwd_kernel(
    x_ptr, stride_xn, stride_xd, w_ptr, stride_wc, stride_wd, b_ptr, cw_ptr, wsum_ptr, tgt_ptr,
    stats_ptr, dloss_ptr, stride_dloss, dlse_ptr, stride_dlse, dx_ptr, dw_ptr, db_ptr,
    N, C, D, n_classes, class_offset, ignore_index,
    label_smoothing, softcap, logit_scale,
    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DLSE: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    GROUP_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Backward, 1-D grid over (row block, class tile) pairs in groups of GROUP_N row blocks.

    Recomputes the zᵀ tile, forms dL/dz from stats (N, 3) = (ref, log s, w_y) (formulas: module
    docstring of kernels/cross_entropy.py) and adds dX[rows] += dz W[tile], dW[tile] += dzᵀ X[rows],
    db[tile] += Σ_rows dz into the fp32 (N, D), (C, D), (C,) accumulators with atomics. ``stats`` may
    come from any forward (e.g. a global lse over vocabulary shards); targets are global class ids,
    ``class_offset`` the first class of this weight, ``n_classes`` the global C.
    """
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    n_tiles = tl.cdiv(C, BLOCK_V)
    per_group = GROUP_N * n_tiles
    first = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(n_row_blocks - first, GROUP_N)
    pid_n = first + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows

    row0 = pid_n.to(tl.int64) * BLOCK_N
    col0 = pid_v * BLOCK_V
    offs_n = tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, BLOCK_V)
    rows = row0 + offs_n
    rmask = rows < N
    cmask = offs_v < C - col0
    ref = tl.load(stats_ptr + 3 * rows, mask=rmask, other=0.0)
    log_s = tl.load(stats_ptr + 3 * rows + 1, mask=rmask, other=0.0)
    row_w = tl.load(stats_ptr + 3 * rows + 2, mask=rmask, other=0.0)
    g = tl.load(dloss_ptr + rows * stride_dloss, mask=rmask, other=0.0)
    y = tl.load(tgt_ptr + rows, mask=rmask, other=ignore_index)
    valid = y != ignore_index
    if HAS_DLSE:
        active = rmask
    else:
        active = valid
    # Inactive rows (and rows past N) get p = 0: their stats may be unset (skipped forward).
    if HAS_DLSE:
        h = tl.load(dlse_ptr + rows * stride_dlse, mask=rmask, other=0.0)
    else:
        h = tl.zeros((BLOCK_N,), tl.float32)
    coef_p, coef_y, coef_u = hard_target_coefficients(
        g, h, row_w, valid, label_smoothing, n_classes, weight_total(wsum_ptr, n_classes, HAS_WEIGHT),
        HAS_SMOOTHING)
    log_s = tl.where(active, log_s, float("inf"))
    # Uniform skip: a block without active rows runs zero iterations of both D loops.
    d_end = tl.where(tl.max(active.to(tl.int32), 0) > 0, D, 0)

    z = _logit_tile(x_ptr, stride_xn, stride_xd, w_ptr, stride_wc, stride_wd, b_ptr,
                    row0, N - row0, col0, C - col0, d_end, logit_scale, softcap,
                    HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_UPCAST)
    dz = coef_p[None, :] * softmax_from_stats(z, ref[None, :], log_s[None, :])
    y_rel = y - class_offset - col0  # the target's column in this tile, or -1
    y_rel = tl.where(valid & (y_rel >= 0) & (y_rel < BLOCK_V), y_rel, -1).to(tl.int32)
    dz -= tl.where(offs_v[:, None] == y_rel[None, :], coef_y[None, :], 0.0)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            w_c = tl.load(cw_ptr + col0 + offs_v, mask=cmask, other=0.0)
        else:
            w_c = tl.full((BLOCK_V,), 1.0, tl.float32)
        dz -= coef_u[None, :] * w_c[:, None]
    dz = transform_grad(dz, z, logit_scale, softcap, HAS_SOFTCAP)
    # Inactive rows must add nothing to dW and db. Classes past C need no mask: their W rows load
    # as 0 (dX) and their dW / db atomics are masked; their dz is finite (z = T(0) there).
    dz = tl.where(active[None, :], dz, 0.0)
    if NEED_DB:
        tl.atomic_add(db_ptr + col0 + offs_v, tl.sum(dz, 1), mask=offs_v < tl.where(d_end > 0, C - col0, 0),
                      sem="relaxed")

    dzc = dz.to(x_ptr.dtype.element_ty)
    if DOT_UPCAST:
        dzc = dzc.to(tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    x_blk = x_ptr + row0 * stride_xn
    w_blk = w_ptr + tl.cast(col0, tl.int64) * stride_wc
    for d0 in range(0, d_end, BLOCK_D):
        dd = d0 + offs_d
        dmask = dd < D
        if NEED_DX:
            w = tl.load(w_blk + (offs_v[:, None] * stride_wc + dd[None, :] * stride_wd),
                        mask=cmask[:, None] & dmask[None, :], other=0.0)
            if DOT_UPCAST:
                w = w.to(tl.float32)
            dx = tl.dot(tl.trans(dzc), w, input_precision=DOT_PRECISION)
            tl.atomic_add(dx_ptr + row0 * D + (offs_n[:, None] * D + dd[None, :]), dx,
                          mask=active[:, None] & dmask[None, :], sem="relaxed")
        if NEED_DW:
            xb = tl.load(x_blk + (offs_n[:, None] * stride_xn + dd[None, :] * stride_xd),
                         mask=rmask[:, None] & dmask[None, :], other=0.0)
            if DOT_UPCAST:
                xb = xb.to(tl.float32)
            dw = tl.dot(dzc, xb, input_precision=DOT_PRECISION)
            tl.atomic_add(dw_ptr + tl.cast(col0, tl.int64) * D + (offs_v[:, None] * D + dd[None, :]), dw,
                          mask=cmask[:, None] & dmask[None, :], sem="relaxed")
