"""Triton jit helpers shared by every kernel: the logit transform and its chain rule, the online
log-sum-exp, the hard-target row loss and its masking, the smoothing / soft-target sums, the entropy
and the gradient coefficients. Each helper has exactly one torch twin of the same name in
``core/formulas_torch.py`` (tests/core/test_twins.py runs every pair on the same inputs and fails on a
helper without a twin); the table of formulas, helpers, twins and call sites is in docs/design.md.
Row addressing (pointer math, no torch twin) lives in ``core/pointers_triton.py``.

One source of truth for the numerics. All arithmetic is fp32; exponentials and logarithms go
through ``exp2``/``log2`` with the named constants below (the hardware's native MUFU ops).

The online log-sum-exp keeps, per row, a finite *reference* ``ref`` (the running maximum, or 0
while every logit seen so far is ``-inf``) and ``s = sum_j exp(z_j - ref)``. When the maximum grows
the sum is rescaled by ``exp(ref_old - ref_new)``. The log-sum-exp is ``ref + log(s)``; callers keep
``ref`` and ``log(s)`` apart so that ``lse - z_y = (ref - z_y) + log(s)`` loses no precision when the
logits are large (|z| ~ 1e4: ``ref + log(s)`` alone would round to ~1e-3).
"""
import triton
import triton.language as tl

# constexpr: the Triton compiler (unlike the interpreter) rejects plain-float globals in @jit code
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2):    log(x) == log2(x) * LN2


@triton.jit
def tanh_f32(u):
    """tanh for fp32, portable to the interpreter (no libdevice), with a small *relative* error
    everywhere (softcap multiplies it by s, so an absolute 1e-7 is not enough): an odd Taylor
    polynomial of degree 15 for |u| < 0.55 (truncation < 1e-8 relative), else
    (1 - e) / (1 + e) with e = exp(-2|u|) in (0, 0.33], which does not cancel there."""
    a = tl.abs(u)
    e = tl.exp2(a * (-2.0 * LOG2E))
    big = (1.0 - e) / (1.0 + e)
    q = a * a
    p = -929569.0 / 638512875.0
    p = p * q + 21844.0 / 6081075.0
    p = p * q - 1382.0 / 155925.0
    p = p * q + 62.0 / 2835.0
    p = p * q - 17.0 / 315.0
    p = p * q + 2.0 / 15.0
    p = p * q - 1.0 / 3.0
    small = a + a * (q * p)
    t = tl.where(a < 0.55, small, big)
    return tl.where(u < 0, -t, t)


@triton.jit
def transform_logits(x, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """z = softcap * tanh(logit_scale * x / softcap) (or logit_scale * x), in fp32."""
    z = x.to(tl.float32) * logit_scale
    if HAS_SOFTCAP:
        z = softcap * tanh_f32(z / softcap)
    return z


@triton.jit
def transform_grad(dz, z, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Chain rule through transform_logits: dL/dx = dL/dz * logit_scale * (1 - (z/softcap)^2)."""
    if HAS_SOFTCAP:
        t = z / softcap
        dz = dz * (1.0 - t * t)
    return dz * logit_scale


@triton.jit
def safe_ref(m):
    """A finite reference for the running maximum m: m itself, or 0 while m is -inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def online_lse_update(m, s, z):
    """Fold a block of logits z (masked lanes = -inf) into the running (max m, sum s).

    Returns (m_new, s_new, ref_old, ref_new) with s_new = sum exp(z_seen - ref_new). Callers that
    keep other sums relative to the reference shift them by (ref_old - ref_new).
    """
    m_new = tl.maximum(m, tl.max(z, 0))
    ref_new = safe_ref(m_new)
    # nothing seen yet (s = 0): no shift. A reference of 0 there would scale 0 by exp(-ref_new),
    # inf once every logit of the row is below -88 (0 * inf = NaN)
    ref_old = tl.where(m == float("-inf"), ref_new, m)
    s_new = s * tl.exp2((ref_old - ref_new) * LOG2E) + tl.sum(tl.exp2((z - ref_new) * LOG2E), 0)
    return m_new, s_new, ref_old, ref_new


@triton.jit
def softmax_from_stats(z, ref, log_s):
    """p = exp(z - lse) with lse = ref + log_s, computed as exp((z - ref) - log_s)."""
    return tl.exp2(((z - ref) - log_s) * LOG2E)


@triton.jit
def weight_total(wsum_ptr, n_classes, HAS_WEIGHT: tl.constexpr):
    """W = sum_j w_j: precomputed for class weights, n_classes without them."""
    if HAS_WEIGHT:
        return tl.load(wsum_ptr)
    else:
        return n_classes * 1.0


@triton.jit
def hard_target_coefficients(g, h, row_w, valid, label_smoothing, n_classes, w_total,
                             HAS_SMOOTHING: tl.constexpr):
    """Coefficients of dL/dz_j = coef_p p_j - coef_y [j = y] - coef_u w_j for a hard target
    (scalars or per-row vectors): g the loss's upstream gradient, h the lse's, row_w = w_y,
    w_total = sum_j w_j. Ignored rows (valid False) keep only the lse term h p_j."""
    coef_y = tl.where(valid, g * (1.0 - label_smoothing) * row_w, 0.0)
    coef_p = coef_y + h
    coef_u = tl.where(valid, g * label_smoothing / n_classes, 0.0)
    if HAS_SMOOTHING:
        coef_p += coef_u * w_total
    return coef_p, coef_y, coef_u


@triton.jit
def entropy_update(e, s_old, z, ref_old, ref_new):
    """Fold a block of logits z (masked lanes -inf) into E = sum_j e^{z_j - ref} (z_j - ref), after
    ``online_lse_update`` moved the reference from ref_old to ref_new (s_old: the sum before that
    update). The entropy of the row is then ``entropy_from_sums(log s, E, s)``."""
    d = ref_old - ref_new
    p = tl.exp2((z - ref_new) * LOG2E)
    return tl.exp2(d * LOG2E) * (e + d * s_old) + tl.sum(tl.where(p > 0, p * (z - ref_new), 0.0), 0)


@triton.jit
def entropy_argmax_update(e, best, best_idx, s_old, z, cols, ref_old, ref_new):
    """``entropy_update`` and the running argmax (first index of the maximum) of a block of logits
    z at columns ``cols`` (masked lanes -inf)."""
    e = entropy_update(e, s_old, z, ref_old, ref_new)
    blk_max = tl.max(z, 0)
    blk_idx = tl.min(tl.where(z == blk_max, cols, 2147483647), 0)
    best_idx = tl.where(blk_max > best, blk_idx, best_idx)
    best = tl.maximum(best, blk_max)
    return e, best, best_idx


@triton.jit
def smoothed_target(t, label_smoothing, n_classes, HAS_SMOOTHING: tl.constexpr):
    """t' = (1 - eps) t + eps / C: a probability target under label smoothing."""
    if HAS_SMOOTHING:
        t = t * (1.0 - label_smoothing) + label_smoothing / n_classes
    return t


@triton.jit
def weighted_sum_update(acc, a_sum, a, z, mask, ref_old, ref_new):
    """Fold a block of coefficients a (0 on masked lanes) at logits z into A = sum_j a_j (z_j - ref)
    and a_sum = sum_j a_j, after ``online_lse_update`` moved the reference from ref_old to ref_new
    (the smoothing term of a hard target, a soft target's sums). Masked lanes (z = -inf) add 0."""
    acc = acc + (ref_old - ref_new) * a_sum + tl.sum(a * tl.where(mask, z - ref_new, 0.0), 0)
    a_sum = a_sum + tl.sum(a, 0)
    return acc, a_sum


@triton.jit
def hard_target_loss(nll_y, smooth, w_y, label_smoothing, n_classes, HAS_SMOOTHING: tl.constexpr):
    """loss = (1 - eps) w_y (lse - z_y) + eps / C sum_j w_j (lse - z_j), from nll_y = lse - z_y
    (formed as (ref - z_y) + log s) and smooth = sum_j w_j (lse - z_j) (formed as W log s - A;
    unused without smoothing). The row loss of every hard-target path."""
    loss = (1.0 - label_smoothing) * w_y * nll_y
    if HAS_SMOOTHING:
        loss += label_smoothing / n_classes * smooth
    return loss


@triton.jit
def finish_hard_rows(loss, w_y, y, ignore_index, n_classes):
    """(loss, row weight) of a hard-target row: 0 for an ignored row, NaN for an out-of-range id
    (it poisons the row and so a mean: no host sync), else (loss, w_y)."""
    valid = y != ignore_index
    ok = valid & (y >= 0) & (y < n_classes)
    bad = valid & ~ok
    row_w = tl.where(bad, float("nan"), tl.where(ok, w_y, 0.0))
    loss = tl.where(bad, float("nan"), tl.where(ok, loss, 0.0))
    return loss, row_w


@triton.jit
def soft_target_grad(g, z, ref, log_s, label_smoothing):
    """dL/dt_j = g (1 - eps) (lse - z_j) (times w_j by the caller): the gradient of a probability
    target that requires grad, with lse - z_j formed as (ref - z_j) + log s."""
    return g * (1.0 - label_smoothing) * ((ref - z) + log_s)


@triton.jit
def entropy_from_sums(log_s, e, s):
    """H = log s - E / s: the entropy of softmax(z) from s = sum_j e^{z_j - ref} and
    E = sum_j e^{z_j - ref} (z_j - ref) (``entropy_argmax_update``)."""
    return log_s - e / s
