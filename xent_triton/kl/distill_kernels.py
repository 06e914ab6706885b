"""Distillation kernels: a streaming forward over a student row and a teacher row, and a
recomputing backward that writes the student's gradient. Derivation in docs/kl.md.

Per row (x student logits, t teacher logits, T temperature, b = x / T, a = t / T, q = softmax(b),
p = softmax(a), divergence D, CE weight alpha, label y; 0 log 0 := 0)::

    kl   D = KL(p||q) = sum p (log p - log q)          dD/db_j = q_j - p_j
    rkl  D = KL(q||p) = sum q (log q - log p)          dD/db_j = q_j (log q_j - log p_j - D)
    jsd  D = beta KL(p||m) + (1-beta) KL(q||m),  m = beta p + (1-beta) q
                                                       dD/db_j = (1-beta) q_j (log q_j - log m_j - K),
                                                       K = KL(q||m)
    loss = alpha CE(x, y) + (1 - alpha) D              (0 for an ignored label)
    dL/dx_j = g [alpha (softmax(x)_j - [j = y]) + (1 - alpha) / T dD/db_j]

Softcap (HAS_SOFTCAP, a runtime float ``softcap``): each model's logits are capped first, z =
softcap tanh(x / softcap) (teacher too, the same cap), then divided by T (Gemma's order: cap(z) / T);
x above stands for the capped z (the CE term too) and dL/dx = dL/dz (1 - (z / softcap)^2).

No T^2 factor. Per-row stats (R, 8) fp32: (ref_p, log s_p, ref_q, log s_q, ref_1, log s_1, extra,
valid) with lse = ref + log s of a, b and x (the CE at T = 1).

fp32 gradients (rkl, jsd): the per-class term minus its q-mean (D or K) cancels where the term is near
its mean, so both are taken relative to a reference that drops out of the difference, and each
stays a small, accurately rounded quantity:
    rkl  log q_j - log p_j - D = w_j - W,  w_j = (b_j - ref_q) - (a_j - ref_p),  W = sum q w
         (the two lses cancel: no rounded log s enters the gradient)
    jsd  log q_j - log m_j - K = h_j - H,  h_j = log q_j - log m_j + log(1-beta)
         = -softplus(log(beta/(1-beta)) - (log q_j - log p_j)) <= 0,  H = sum q h
         (H sums terms of one sign; h keeps fp32 relative accuracy via a compensated log1p)
extra = W (rkl) or H (jsd).

Grids and bytes (B bytes per logit, both models in one dtype, R rows): forward grid (R,) reads both
rows once (2 R C B; jsd a second time: 4 R C B) and writes 36 R; an ignored row reads nothing.
Backward grid (R, splits) reads both rows and writes the gradient (3 R C B). Forward + backward:
5x the student logits' bytes for kl / rkl, 7x for jsd (+ O(R)).
"""
import triton
import triton.language as tl

from ..core.formulas_triton import LN2, LOG2E, online_lse_update, safe_ref, transform_grad, transform_logits

KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
N_STATS = 8


@triton.jit
def mixture_gaps(logp, logq, beta):
    """(log p - log m, log q - log m), m = beta p + (1-beta) q, from d = log q - log p alone:
    log m - log q = log(beta e^{-d} + 1 - beta) for d >= 0, log m - log p = log(beta + (1-beta) e^d)
    for d < 0 (no overflow; the other gap differs by d). Where p ~ q the gaps are the log of a
    number near 1, exact to its relative rounding: never the difference of two rounded log m,
    log p of size |log p| (that cost ~10x torch's fp32 error). Lanes with p = q = 0 give NaN:
    callers mask them (0 log 0 := 0)."""
    d = logq - logp
    pos = d >= 0
    e = tl.exp2(-tl.abs(d) * LOG2E)
    small = tl.log2(tl.where(pos, beta * e + (1.0 - beta), beta + (1.0 - beta) * e)) * LN2
    return -tl.where(pos, small + d, small), -tl.where(pos, small, small - d)


@triton.jit
def log1p_f32(x):
    """log(1 + x) for x >= 0: log(u) of u = 1 + x rounded, corrected by the rounding of u,
    ((u - 1) - x) / u (exact: Fast2Sum), to first order; no branch (x tiny: u = 1, gives x)."""
    u = 1.0 + x
    return tl.log2(u) * LN2 - ((u - 1.0) - x) / u


@triton.jit
def mixture_excess(logp, logq, log_rho):
    """h = log q - log m + log(1-beta) = -softplus(log_rho - (log q - log p)) <= 0, log_rho =
    log(beta / (1-beta)) (module docstring): no cancellation with its q-mean in the backward.
    NaN where p = q = 0: callers mask it."""
    z = log_rho - (logq - logp)
    return -(tl.maximum(z, 0.0) + log1p_f32(tl.exp2(-tl.abs(z) * LOG2E)))


@triton.jit
def xlogy_ratio(p, logp, logr):
    """p (log p - log r) with 0 log 0 := 0."""
    return tl.where(p > 0, p * (logp - logr), 0.0)


@triton.jit
def shift_cross(cross, s_old, ro_old, ro_new, rx_old, rx_new):
    """Move cross = sum e^{u - ro} ((u - ro) - (v - rx)) (s_old = sum e^{u - ro_old}) from the
    references (ro_old, rx_old) to (ro_new, rx_new): e^{d} (cross + (d + rx_new - rx_old) s_old),
    d = ro_old - ro_new."""
    d = ro_old - ro_new
    return tl.exp2(d * LOG2E) * (cross + (d + (rx_new - rx_old)) * s_old)


@triton.jit
def distill_fwd_kernel(
    s_ptr, stride_sn, stride_sc, t_ptr, stride_tn, stride_tc, lbl_ptr,
    loss_ptr, stats_ptr, C, ignore_index,
    temperature, ce_weight, beta, softcap,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Forward, one program per row (grid (R,)): online (max, sum) of a, b (and x for the CE) and
    the cross sum of the divergence, sum e^{a-ref_p}((a - ref_p) - (b - ref_q)) (kl) or
    sum e^{b-ref_q}((b - ref_q) - (a - ref_p)) (rkl), moved with the references (shift_cross);
    jsd reads the rows a second time with the final lses.
    Writes loss_r and stats_r (module docstring)."""
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    s_row = s_ptr + r * stride_sn
    t_row = t_ptr + r * stride_tn
    if HAS_LABELS:
        y = tl.load(lbl_ptr + r)
        valid = y != ignore_index
        in_range = (y >= 0) & (y < C)
        ok = valid & in_range
    else:
        y = 0
        valid = r >= 0
        ok = valid
    c_lim = tl.where(ok, C, 0)  # an ignored row reads nothing
    m_p = tl.full((), float("-inf"), tl.float32)
    m_q = tl.full((), float("-inf"), tl.float32)
    m_1 = tl.full((), float("-inf"), tl.float32)
    s_p = tl.zeros((), tl.float32)
    s_q = tl.zeros((), tl.float32)
    s_1 = tl.zeros((), tl.float32)
    cross = tl.zeros((), tl.float32)
    for start in range(0, C, BLOCK_C):
        cols = start + offs
        mask = cols < c_lim
        x = tl.load(s_row + cols.to(tl.int64) * stride_sc, mask=mask, other=float("-inf")).to(tl.float32)
        tv = tl.load(t_row + cols.to(tl.int64) * stride_tc, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:  # masked lanes stay -inf (a capped -inf would be -softcap)
            x = tl.where(mask, transform_logits(x, 1.0, softcap, HAS_SOFTCAP), float("-inf"))
            tv = tl.where(mask, transform_logits(tv, 1.0, softcap, HAS_SOFTCAP), float("-inf"))
        b = x / temperature
        a = tv / temperature
        sp_old = s_p
        sq_old = s_q
        m_p, s_p, rp_old, rp_new = online_lse_update(m_p, s_p, a)
        m_q, s_q, rq_old, rq_new = online_lse_update(m_q, s_q, b)
        if HAS_CE:
            m_1, s_1, _r1o, _r1n = online_lse_update(m_1, s_1, x)
        # each side relative to its own reference: no two large terms cancel, whatever the
        # offset between the models' logits (see the module docstring)
        if DIVERGENCE == KL:
            cross = shift_cross(cross, sp_old, rp_old, rp_new, rq_old, rq_new)
            e = tl.exp2((a - rp_new) * LOG2E)
            cross += tl.sum(tl.where(e > 0, e * ((a - rp_new) - (b - rq_new)), 0.0), 0)
        elif DIVERGENCE == REVERSE_KL:
            cross = shift_cross(cross, sq_old, rq_old, rq_new, rp_old, rp_new)
            e = tl.exp2((b - rq_new) * LOG2E)
            cross += tl.sum(tl.where(e > 0, e * ((b - rq_new) - (a - rp_new)), 0.0), 0)
    ref_p = safe_ref(m_p)
    ref_q = safe_ref(m_q)
    log_sp = tl.log2(s_p) * LN2
    log_sq = tl.log2(s_q) * LN2
    extra = tl.zeros((), tl.float32)
    if DIVERGENCE == KL:
        div = cross / s_p + (log_sq - log_sp)
    elif DIVERGENCE == REVERSE_KL:
        extra = cross / s_q  # W (module docstring)
        div = extra + (log_sp - log_sq)
    else:
        kl_pm = tl.zeros((), tl.float32)
        kl_qm = tl.zeros((), tl.float32)
        log_rho = tl.log2(beta / (1.0 - beta)) * LN2
        for start in range(0, C, BLOCK_C):
            cols = start + offs
            mask = cols < c_lim
            x = tl.load(s_row + cols.to(tl.int64) * stride_sc, mask=mask, other=float("-inf")).to(tl.float32)
            tv = tl.load(t_row + cols.to(tl.int64) * stride_tc, mask=mask, other=float("-inf")).to(tl.float32)
            if HAS_SOFTCAP:
                x = tl.where(mask, transform_logits(x, 1.0, softcap, HAS_SOFTCAP), float("-inf"))
                tv = tl.where(mask, transform_logits(tv, 1.0, softcap, HAS_SOFTCAP), float("-inf"))
            logp = (tv / temperature - ref_p) - log_sp
            logq = (x / temperature - ref_q) - log_sq
            gap_p, gap_q = mixture_gaps(logp, logq, beta)
            p = tl.exp2(logp * LOG2E)
            q = tl.exp2(logq * LOG2E)
            kl_pm += tl.sum(tl.where(p > 0, p * gap_p, 0.0), 0)
            kl_qm += tl.sum(tl.where(q > 0, q * gap_q, 0.0), 0)
            extra += tl.sum(tl.where(q > 0, q * mixture_excess(logp, logq, log_rho), 0.0), 0)
        div = beta * kl_pm + (1.0 - beta) * kl_qm
    ref_1 = safe_ref(m_1)
    log_s1 = tl.log2(s_1) * LN2
    loss = div
    if HAS_CE:
        y_safe = tl.where(ok, y, 0).to(tl.int64)
        x_y = transform_logits(tl.load(s_row + y_safe * stride_sc), 1.0, softcap, HAS_SOFTCAP)
        loss = ce_weight * ((ref_1 - x_y) + log_s1) + (1.0 - ce_weight) * div
    loss = tl.where(ok, loss, 0.0)
    row_valid = tl.where(ok, 1.0, 0.0)
    if HAS_LABELS:
        # an out-of-range label poisons its row (and so a mean) with NaN: no host sync needed
        loss = tl.where(valid & ~in_range, float("nan"), loss)
        row_valid = tl.where(valid & ~in_range, float("nan"), row_valid)
    tl.store(loss_ptr + r, loss)
    st = stats_ptr + 8 * r
    tl.store(st, ref_p)
    tl.store(st + 1, log_sp)
    tl.store(st + 2, ref_q)
    tl.store(st + 3, log_sq)
    tl.store(st + 4, ref_1)
    tl.store(st + 5, log_s1)
    tl.store(st + 6, extra)
    tl.store(st + 7, row_valid)


@triton.jit
def distill_bwd_kernel(
    s_ptr, stride_sn, stride_sc, t_ptr, stride_tn, stride_tc, lbl_ptr,
    dx_ptr, stride_gn, stride_gc, stats_ptr, dloss_ptr, stride_dloss, C, ignore_index, span,
    temperature, ce_weight, beta, softcap,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Backward, grid (R, splits): program (r, k) recomputes q, p (and softmax(x)) over columns
    [k span, (k+1) span) of row r from the saved stats and writes dL/dx (module docstring).
    dx may alias x (each block is read before it is written). An ignored row reads nothing and
    writes zeros."""
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    c_begin = tl.program_id(1) * span
    c_end = tl.minimum(c_begin + span, C)
    s_row = s_ptr + r * stride_sn
    t_row = t_ptr + r * stride_tn
    dx_row = dx_ptr + r * stride_gn
    st = stats_ptr + 8 * r
    ref_p = tl.load(st)
    log_sp = tl.load(st + 1)
    ref_q = tl.load(st + 2)
    log_sq = tl.load(st + 3)
    ref_1 = tl.load(st + 4)
    log_s1 = tl.load(st + 5)
    extra = tl.load(st + 6)
    g = tl.load(dloss_ptr + r * stride_dloss)
    if HAS_LABELS:
        y = tl.load(lbl_ptr + r)
        active = y != ignore_index
    else:
        y = -1
        active = r >= 0
    c_active = tl.where(active, c_end, 0)
    g_div = g * (1.0 - ce_weight) / temperature
    log_rho = tl.log2(beta / (1.0 - beta)) * LN2
    for start in range(c_begin, c_end, BLOCK_C):
        cols = start + offs
        mask = cols < c_end
        lmask = cols < c_active
        x = transform_logits(tl.load(s_row + cols.to(tl.int64) * stride_sc, mask=lmask, other=0.0), 1.0,
                             softcap, HAS_SOFTCAP)
        tv = transform_logits(tl.load(t_row + cols.to(tl.int64) * stride_tc, mask=lmask, other=0.0), 1.0,
                              softcap, HAS_SOFTCAP)
        u = x / temperature - ref_q
        v = tv / temperature - ref_p
        logq = u - log_sq
        q = tl.exp2(logq * LOG2E)
        if DIVERGENCE == KL:
            dd = q - tl.exp2((v - log_sp) * LOG2E)
        elif DIVERGENCE == REVERSE_KL:
            dd = tl.where(q > 0, q * ((u - v) - extra), 0.0)
        else:
            h = mixture_excess(v - log_sp, logq, log_rho)
            dd = (1.0 - beta) * tl.where(q > 0, q * (h - extra), 0.0)
        dx = g_div * dd
        if HAS_CE:
            sm1 = tl.exp2(((x - ref_1) - log_s1) * LOG2E)
            dx += (g * ce_weight) * (sm1 - tl.where(cols == y, 1.0, 0.0))
        dx = tl.where(active, transform_grad(dx, x, 1.0, softcap, HAS_SOFTCAP), 0.0)
        tl.store(dx_row + cols.to(tl.int64) * stride_gc, dx.to(dx_ptr.dtype.element_ty), mask=mask)
