"""Forward kernel for one vocabulary shard under tensor parallelism: per-row partial statistics.

A rank holding columns [start, start + C) of a C_global-class vocabulary streams its shard once
(``stream_row``: the same online log-sum-exp as the single-device forward) and writes, per row r,
five fp32 *partials* (``part[r, :]``)::

    m     = max_j z_j over the shard (-inf when every logit of the shard is -inf)
    s     = sum_j exp(z_j - ref),            ref = safe_ref(m) (0 when m = -inf)
    A     = sum_j a_j (z_j - ref)            (smoothing / soft targets only, else 0)
    a_sum = sum_j a_j                        (smoothing / soft targets only, else 0)
    z_y   = z at the row's target if the target lives in this shard, else 0 (hard targets only)

with a_j = w_j t'_j (soft, t' = (1-eps) t + eps / n_classes) or w_j (hard smoothing) and
n_classes = C_global. The target is *localized* (global id - start; any id outside [0, C) means
"not in this shard"), the weight pointer is this shard's slice of the global class weights.
``xent_triton.distributed.combine_partials`` turns the partials of all ranks into the global
(loss, lse, stats) with two O(rows) collectives; the backward is the single-device
``cross_entropy_bwd_kernel`` unchanged, fed the global stats and n_classes = C_global.

Bytes: R*C*B read + 8 R (target) + 20 R (partials) written: the same single read as the
single-device forward.
"""
import triton
import triton.language as tl

from ..core.formulas_triton import transform_logits
from ..core.pointers_triton import row_pointer
from .kernels import stream_row


@triton.jit
def vocab_parallel_fwd_kernel(
    x_ptr, stride_xn, stride_xd, stride_xc,
    tgt_ptr, w_ptr,
    soft_ptr, stride_tn, stride_td, stride_tc,
    part_ptr,
    C, D, n_classes,
    label_smoothing, softcap, logit_scale,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, SOFT_TARGET: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per row (grid = (R,)): stream the shard's row, write (m, s, A, a_sum, z_y)."""
    r = tl.program_id(0).to(tl.int64)
    x_row = row_pointer(x_ptr, r, D, stride_xn, stride_xd)
    if SOFT_TARGET:
        t_row = row_pointer(soft_ptr, r, D, stride_tn, stride_td)
    else:
        t_row = soft_ptr
    m, s, acc, a_sum, _, _ = stream_row(x_row, stride_xc, t_row, stride_tc, w_ptr, C, n_classes,
                                  label_smoothing, softcap, logit_scale,
                                  HAS_WEIGHT, HAS_SMOOTHING, SOFT_TARGET, HAS_SOFTCAP, BLOCK_C)
    if SOFT_TARGET:
        z_y = 0.0
    else:
        y = tl.load(tgt_ptr + r)  # localized, int64
        owned = (y >= 0) & (y < C)
        x_y = tl.load(x_row + tl.where(owned, y, 0) * stride_xc, mask=owned, other=0.0)
        z_y = tl.where(owned, transform_logits(x_y, logit_scale, softcap, HAS_SOFTCAP), 0.0)
    base = part_ptr + 5 * r
    tl.store(base, m)
    tl.store(base + 1, s)
    tl.store(base + 2, acc)
    tl.store(base + 3, a_sum)
    tl.store(base + 4, z_y)
