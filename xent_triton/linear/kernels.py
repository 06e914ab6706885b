"""Fused linear cross-entropy: z = T(X Wᵀ + b), softmax, loss and gradients, tile by tile in SRAM.

X (N, D) hidden states, W (C, D) the classifier, b (C,) its bias. The N×C logits never exist in
memory: every kernel forms (BLOCK_N rows × BLOCK_V classes) logit tiles in registers (fp32
tensor-core accumulation over D in BLOCK_D steps), viewed transposed (classes on axis 0, exactly
like the 1-D row blocks of the core kernels) and folded into per-row statistics by the shared
online log-sum-exp of ``common.py``, unchanged. Loss and gradient formulas are those of
``cross_entropy/kernels.py``'s docstring (hard targets); ``linear_ops.combine`` assembles the loss.

Algorithm (FLOPs counted as 2·M·N·K per dot; P = N·D·C):

* forward ``linear_xent_fwd_kernel``, 1-D grid of (class split × row block) programs: each sweeps
  its span of class tiles and writes per-row *partials* (m, s, A, a_sum, z_y) of its span: 2P.
  z_y is selected from the same logit tile the softmax uses (one value of z, whatever the dot
  precision: TF32 included).
  ``combine`` (torch, O(N·splits)) merges the partials into loss, lse and the (ref, log s, w_y)
  stats the core saves. A vocabulary shard (``class_offset``, global ``n_classes``) produces the
  same partials, merged across ranks by the same combine: the tensor-parallel door.
* backward: not a kernel of this module any more. The package recomputes the logits by
  vocabulary splits on vendor GEMMs (``linear/chunked.py``: ``chunk_grad_kernel`` forms dZ,
  then dX += dZ W_s, dW_s = dZᵀ X; 6P, deterministic, no atomics), or forms the gradients in
  the forward pass by token chunks for a scalar upstream gradient (4P more). The former atomic
  tile backward (fp32 ``atomic_add`` of dX / dW) was removed: it spilled and was no longer launched.
* total 8P = 4.0 × the 2P of the logits GEMM (forward partials + recompute backward).

Choices:

* ignored tokens: the forward skips all-ignored row blocks unless the lse is returned
  (``SKIP_IGNORED``; a uniform scalar loop bound, no host sync). Padding packed at the end of
  sequences is skipped for free.
* tiles (``core/launch.py``): 64 × 128 × 64 (bf16 / fp16), 8 warps; see the launch notes and the
  static report.

Budget of the forward, Llama-3-8B head: N = 8192 tokens, D = 4096, C = 128256, bf16 (H100 SXM
990 TFLOP/s dense bf16): 2P = 8.6 PFLOP, 8.7 ms at peak; HBM: X 0.07 GB and W 1.05 GB read about
once; operand tiles L2→SM (BN + BV)·D·2 bytes per 2·BN·BV·D FLOPs = 1 byte per 42.7 FLOPs.
Memory beyond inputs and outputs: partials 20 bytes × splits per row; no N×C buffer.
"""
import triton
import triton.language as tl

from ..core.formulas_triton import online_lse_update, transform_logits, weighted_sum_update


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
    a_sum = tl.zeros((1,), tl.float32)  # the same for every row (a_j depends on the class only)
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
            acc, a_sum = weighted_sum_update(acc, a_sum, a[:, None], z, cmask[:, None], ref_old, ref_new)
    out = part_ptr + (split * N + rows) * 5  # partials layout (splits, N, 5): see xent_triton.core.partials
    tl.store(out, m, mask=rmask)
    tl.store(out + 1, s, mask=rmask)
    tl.store(out + 2, acc, mask=rmask)
    tl.store(out + 3, tl.zeros((BLOCK_N,), tl.float32) + a_sum, mask=rmask)
    tl.store(out + 4, z_y, mask=rmask)
