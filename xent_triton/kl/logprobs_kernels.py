"""Token log-probability (and entropy) kernels: one streaming forward, one recomputing backward.

Per row (x logits, T temperature, b = x / T, q = softmax(b), y the token; derivation in
docs/kl.md)::

    lp = log q_y = (b_y - ref) - log s                    s = sum_j e^{b_j - ref}
    H  = -sum_j q_j log q_j = log s - A / s               A = sum_j e^{b_j - ref} (b_j - ref)
    dL/dx_j = (1/T) [g_lp ([j = y] - q_j) - g_H q_j (log q_j + H)]

Softcap (HAS_SOFTCAP, a runtime float ``softcap``): x above is the capped z = softcap tanh(x / softcap),
applied before the temperature (b = z / T, as Gemma), and dL/dx = dL/dz (1 - (z / softcap)^2).

A is shifted with the reference: A <- e^{d} (A + d s) with d = ref_old - ref_new, so H never
subtracts two large numbers. Stats per row (R, 2): (ref, log s).

Ignored rows (token == ``ignore_index``, a runtime int): the forward's loop bound is 0 for them (the
CE forward's ``SKIP_IGNORED``): no logit read, lp 0, H 0, stats (0, 0); the backward reads no logit of
theirs and writes a zero gradient row. Valid rows are bitwise unchanged.

Grids and bytes (B bytes per logit, R rows, a fraction f of them ignored): forward grid (R,) reads
(1 - f) R C B once (+ the token's logit) and writes 16 R; backward grid (R, splits) reads (1 - f) R C B
and writes R C B (every gradient row, zeros included). Forward + backward = (3 - 2f)x the logits'
bytes (+ O(R)), with or without the entropy; the forward alone (1 - f)x.
"""
import triton
import triton.language as tl

from ..core.formulas_triton import (
    LN2,
    LOG2E,
    entropy_from_sums,
    entropy_update,
    online_lse_update,
    safe_ref,
    transform_grad,
    transform_logits,
)


@triton.jit
def logprobs_fwd_kernel(
    x_ptr, stride_xn, stride_xc, tok_ptr, lp_ptr, ent_ptr, stats_ptr, C, ignore_index, temperature, softcap,
    ENTROPY: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Forward, one program per row (grid (R,)): online (max, sum) of b and (ENTROPY) the shifted
    sum A; writes lp_r, H_r (ENTROPY) and stats_r. An out-of-range token makes lp_r NaN; an ignored
    one (== ignore_index) reads no logit and writes lp 0, H 0, stats (0, 0)."""
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    x_row = x_ptr + r * stride_xn
    y = tl.load(tok_ptr + r)
    kept = y != ignore_index
    c_stream = tl.where(kept, C, 0)  # a uniform scalar loop bound: 0 iterations if ignored
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    acc = tl.zeros((), tl.float32)
    for start in range(0, c_stream, BLOCK_C):
        cols = start + offs
        mask = cols < C
        x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:  # masked lanes stay -inf (a capped -inf would be -softcap)
            x = tl.where(mask, transform_logits(x, 1.0, softcap, HAS_SOFTCAP), float("-inf"))
        b = x / temperature
        s_old = s
        m, s, ref_old, ref_new = online_lse_update(m, s, b)
        if ENTROPY:
            acc = entropy_update(acc, s_old, b, ref_old, ref_new)
    ref = safe_ref(m)  # 0 for an ignored row (nothing streamed) ...
    s = tl.where(kept, s, 1.0)  # ... and s = 1: log s = 0, H = 0 - 0 / 1 (no 0 / 0 computed)
    log_s = tl.log2(s) * LN2
    in_range = (y >= 0) & (y < C)
    y_safe = tl.where(in_range, y, 0).to(tl.int64)
    x_y = tl.load(x_row + y_safe * stride_xc, mask=kept, other=0.0)
    b_y = transform_logits(x_y, 1.0, softcap, HAS_SOFTCAP) / temperature
    lp = tl.where(in_range, (b_y - ref) - log_s, float("nan"))
    tl.store(lp_ptr + r, tl.where(kept, lp, 0.0))
    if ENTROPY:
        tl.store(ent_ptr + r, tl.where(kept, entropy_from_sums(log_s, acc, s), 0.0))
    tl.store(stats_ptr + 2 * r, ref)
    tl.store(stats_ptr + 2 * r + 1, log_s)


@triton.jit
def logprobs_bwd_kernel(
    x_ptr, stride_xn, stride_xc, tok_ptr, ent_ptr, stats_ptr, dx_ptr, stride_gn, stride_gc,
    dlp_ptr, stride_dlp, dent_ptr, stride_dent, C, ignore_index, span, temperature, softcap,
    HAS_DENT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Backward, grid (R, splits): program (r, k) recomputes q over columns [k span, (k+1) span)
    of row r from (ref, log s) and writes dL/dx (module docstring); dx may alias x. An ignored row
    (token == ignore_index) reads no logit and writes zeros (whatever its upstream gradients)."""
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    c_begin = tl.program_id(1) * span
    c_end = tl.minimum(c_begin + span, C)
    x_row = x_ptr + r * stride_xn
    dx_row = dx_ptr + r * stride_gn
    ref = tl.load(stats_ptr + 2 * r)
    log_s = tl.load(stats_ptr + 2 * r + 1)
    y = tl.load(tok_ptr + r)
    kept = y != ignore_index
    # (a block mask combined with a scalar flag by comparison: the interpreter mistypes `mask & flag`)
    c_read = tl.where(kept, c_end, 0)
    g_lp = tl.load(dlp_ptr + r * stride_dlp) / temperature
    if HAS_DENT:
        g_h = tl.load(dent_ptr + r * stride_dent) / temperature
        h = tl.load(ent_ptr + r)
    for start in range(c_begin, c_end, BLOCK_C):
        cols = start + offs
        mask = cols < c_end
        x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=cols < c_read, other=0.0)
        x = transform_logits(x, 1.0, softcap, HAS_SOFTCAP)
        logq = (x / temperature - ref) - log_s
        q = tl.exp2(logq * LOG2E)
        dx = g_lp * (tl.where(cols == y, 1.0, 0.0) - q)
        if HAS_DENT:
            dx -= g_h * tl.where(q > 0, q * (logq + h), 0.0)
        dx = tl.where(kept, transform_grad(dx, x, 1.0, softcap, HAS_SOFTCAP), 0.0)
        tl.store(dx_row + cols.to(tl.int64) * stride_gc, dx.to(dx_ptr.dtype.element_ty), mask=mask)
