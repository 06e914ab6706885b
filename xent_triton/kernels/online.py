"""Triton jit helpers shared by every kernel: the logit transform and the online log-sum-exp.

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
    """tanh for fp32 from exp2, portable to the interpreter (no libdevice). Absolute error ~1e-7."""
    e = tl.exp2(u * (2.0 * LOG2E))  # exp(2u); inf for large u gives exactly 1
    return 1.0 - 2.0 / (e + 1.0)


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
    ref_old = safe_ref(m)
    ref_new = safe_ref(m_new)
    s_new = s * tl.exp2((ref_old - ref_new) * LOG2E) + tl.sum(tl.exp2((z - ref_new) * LOG2E), 0)
    return m_new, s_new, ref_old, ref_new


@triton.jit
def softmax_from_stats(z, ref, log_s):
    """p = exp(z - lse) with lse = ref + log_s, computed as exp((z - ref) - log_s)."""
    return tl.exp2(((z - ref) - log_s) * LOG2E)
