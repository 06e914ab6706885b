"""Torch twins of the distillation and log-prob kernels (``kl/distill_kernels.py``,
``kl/logprobs_kernels.py``): same formulas, same per-row stats, for tensors Triton does not serve
(plain CPU tensors without the interpreter, float64). Computed in the compute dtype (float32, or
float64 for float64 students) on whole (R, C) rows: N x C temporaries are fine on this path.
The log-prob twins walk cache-sized row blocks instead, in place where the caller allows (the
linear head's own chunk): few passes, no (R, C) temporaries (the TRL SFT head's CPU time, issue 19).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..core.formulas_torch import entropy_from_sums, safe_ref, transform_grad, transform_logits
from ..core.row_blocks import BLOCK_ELEMS
from ..core.runtime import compute_dtype
from ..linear.chunk_torch import row_blocks
from .options import DIVERGENCES, KLOptions

KL, REVERSE_KL, JSD = (DIVERGENCES.index(d) for d in ("kl", "reverse_kl", "jsd"))
N_STATS = 8


def row_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    """(ref, log s) of each row of z: ref = safe max, s = sum exp(z - ref)."""
    ref = safe_ref(z.amax(-1)) if z.shape[-1] else torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
    return ref, torch.log(torch.exp(z - ref[:, None]).sum(-1))


def log_softmax_from(z: Tensor, ref: Tensor, log_s: Tensor) -> Tensor:
    return (z - ref[:, None]) - log_s[:, None]


def xlogy_ratio(p: Tensor, logp: Tensor, logr: Tensor) -> Tensor:
    """p (log p - log r) with 0 log 0 := 0."""
    return torch.where(p > 0, p * (logp - logr), torch.zeros_like(p))


def mixture_gaps(logp: Tensor, logq: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(log p - log m, log q - log m), m = beta p + (1 - beta) q, from d = log q - log p (the
    kernel's ``mixture_gaps``: accurate where p ~ q; NaN where p = q = 0, masked by callers)."""
    d = logq - logp
    pos = d >= 0
    e = torch.exp(-d.abs())
    small = torch.log(torch.where(pos, beta * e + (1 - beta), beta + (1 - beta) * e))
    return -torch.where(pos, small + d, small), -torch.where(pos, small, small - d)


def mixture_excess(logp: Tensor, logq: Tensor, beta: float) -> Tensor:
    """h = log q - log m + log(1 - beta) <= 0 (the kernel's ``mixture_excess``; NaN where p = q = 0,
    masked by callers)."""
    z = (math.log(beta) - math.log1p(-beta)) - (logq - logp)
    return -(z.clamp_min(0) + torch.log1p(torch.exp(-z.abs())))


def distill_forward(x: Tensor, t: Tensor, labels: Optional[Tensor],
                    opts: KLOptions) -> tuple[Tensor, Tensor]:
    """(loss (R,), stats (R, 8)) of student rows x and teacher rows t (see the kernel); with a
    softcap both are capped first (``transform_logits``), then divided by the temperature."""
    divergence, beta, temperature = DIVERGENCES.index(opts.divergence), opts.beta, opts.temperature
    ignore_index, ce_weight = opts.ignore_index, opts.ce_weight
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = transform_logits(x.to(cdt), 1.0, opts.softcap)
    b, a = xs / temperature, transform_logits(t.to(cdt), 1.0, opts.softcap) / temperature
    ref_p, log_sp = row_stats(a)
    ref_q, log_sq = row_stats(b)
    logp, logq = log_softmax_from(a, ref_p, log_sp), log_softmax_from(b, ref_q, log_sq)
    p, q = torch.exp(logp), torch.exp(logq)
    extra = torch.zeros_like(ref_p)
    if divergence == KL:
        div = xlogy_ratio(p, logp, logq).sum(-1)
    elif divergence == REVERSE_KL:
        # extra = W, the q-mean of w = (b - ref_q) - (a - ref_p) (the kernel's docstring)
        w = (b - ref_q[:, None]) - (a - ref_p[:, None])
        extra = torch.where(q > 0, q * w, torch.zeros_like(q)).sum(-1, dtype=torch.float64).to(cdt)
        div = xlogy_ratio(q, logq, logp).sum(-1, dtype=torch.float64).to(cdt)
    else:
        gap_p, gap_q = mixture_gaps(logp, logq, beta)
        zero = torch.zeros_like(p)
        # extra = H, the q-mean of h = mixture_excess (the kernel's docstring)
        extra = torch.where(q > 0, q * mixture_excess(logp, logq, beta), zero).sum(-1)
        div = (beta * torch.where(p > 0, p * gap_p, zero).sum(-1)
               + (1 - beta) * torch.where(q > 0, q * gap_q, zero).sum(-1, dtype=torch.float64).to(cdt))
    ref_1, log_s1 = row_stats(xs)
    loss = div
    R = x.shape[0]
    ok = torch.ones(R, dtype=torch.bool, device=x.device)
    if labels is not None:
        ok = labels != ignore_index
        if ce_weight != 0:
            y = torch.where(ok, labels, 0)
            ce = (ref_1 - xs.gather(1, y[:, None])[:, 0]) + log_s1
            loss = ce_weight * ce + (1 - ce_weight) * div
    loss = torch.where(ok, loss, torch.zeros_like(loss))
    stats = torch.stack([ref_p, log_sp, ref_q, log_sq, ref_1, log_s1, extra, ok.to(cdt)], dim=1)
    return loss, stats


def distill_backward(x: Tensor, t: Tensor, labels: Optional[Tensor], stats: Tensor, dloss: Tensor,
                     opts: KLOptions) -> Tensor:
    """dL/dx (x's dtype) from the forward's stats and the per-row upstream gradient (through the
    softcap by ``transform_grad``)."""
    divergence, beta, temperature = DIVERGENCES.index(opts.divergence), opts.beta, opts.temperature
    ignore_index, ce_weight = opts.ignore_index, opts.ce_weight
    cdt = stats.dtype
    xs = transform_logits(x.to(cdt), 1.0, opts.softcap)
    ref_p, log_sp, ref_q, log_sq, ref_1, log_s1, extra = stats[:, :7].unbind(1)
    u = xs / temperature - ref_q[:, None]
    v = transform_logits(t.to(cdt), 1.0, opts.softcap) / temperature - ref_p[:, None]
    logq, logp = u - log_sq[:, None], v - log_sp[:, None]
    q = torch.exp(logq)
    if divergence == KL:
        dd = q - torch.exp(logp)
    elif divergence == REVERSE_KL:
        dd = torch.where(q > 0, q * ((u - v) - extra[:, None]), torch.zeros_like(q))
    else:
        h = mixture_excess(logp, logq, beta)
        dd = (1 - beta) * torch.where(q > 0, q * (h - extra[:, None]), torch.zeros_like(q))
    g = dloss.to(cdt)[:, None]
    dx = g * (1 - ce_weight) / temperature * dd
    if labels is not None:
        ok = labels != ignore_index
        if ce_weight != 0:
            sm1 = torch.exp(log_softmax_from(xs, ref_1, log_s1))
            onehot = torch.zeros_like(sm1).scatter_(1, torch.where(ok, labels, 0)[:, None], 1.0)
            dx = dx + g * ce_weight * (sm1 - onehot)
        dx = torch.where(ok[:, None], dx, torch.zeros_like(dx))
    return transform_grad(dx, xs, 1.0, opts.softcap).to(x.dtype)


LOGQ_FLOOR = -1e4  # log-probabilities below it have exp() == 0 in float32 and float64: clamped there,
# 0 * log 0 terms read 0 * LOGQ_FLOOR = 0 (not NaN) with no masking pass; NaN still propagates


def copied_blocks(x: Tensor):
    """``row_blocks`` for rows that must stay unchanged (a caller's logits): every block is copied
    into one reused compute-dtype buffer (16-bit rows are already copied by ``row_blocks``)."""
    if x.dtype != compute_dtype(x):
        yield from row_blocks(x)
        return
    rows, C = x.shape
    step = max(1, BLOCK_ELEMS // max(1, C))
    buf = torch.empty(min(rows, step) * C, dtype=x.dtype, device=x.device)
    for s0 in range(0, rows, step):
        s = slice(s0, min(rows, s0 + step))
        yield s, buf[:(s.stop - s0) * C].view(-1, C).copy_(x[s])


def block_buffer(x: Tensor) -> Tensor:
    """A second compute-dtype buffer of one row block (for exp() next to the values it came from)."""
    rows, C = x.shape
    step = max(1, BLOCK_ELEMS // max(1, C))
    return torch.empty(min(rows, step) * C, dtype=compute_dtype(x), device=x.device)


def logprobs_forward(x: Tensor, tokens: Tensor, opts: KLOptions,
                     scratch: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(lp (R,), H (R,) or (0,), stats (R, 2) = (ref, log s)) of rows x (see kl/logprobs_kernels.py), in
    cache-sized row blocks: b = x / T, ref = safe max b, d = b - ref, s = sum e^d, lp = (b_y - ref) -
    log s, H = log s - sum(e^d d) / s (e^d d by an in-place product and torch's sum: a bmm dot
    product accumulated 2e-5 of error at C = 32000, torch's own fp32 entropy 5e-6). ``scratch``: x
    may be overwritten (a chunk of logits the caller formed; no copy of fp32 rows). A softcap caps
    each block first (``transform_logits``, one more block-sized temporary). A row whose token is
    ``opts.ignore_index`` gives lp 0, H 0, stats (0, 0) as the kernel's (computed, then replaced: no
    host sync to leave it out of the block; the kernel reads none of its logits)."""
    temperature, entropy, softcap = opts.temperature, opts.return_entropy, opts.softcap
    R, C = x.shape
    cdt = compute_dtype(x)
    lp, stats = x.new_empty((R,), dtype=cdt), x.new_empty((R, 2), dtype=cdt)
    ent = x.new_empty((R if entropy else 0,), dtype=cdt)
    ignored = tokens == opts.ignore_index
    if C == 0:  # no classes: log s = -inf as torch's logsumexp (no token can be valid; ignored: 0)
        stats[:, 0], stats[:, 1] = 0.0, float("-inf")
        lp.fill_(float("nan"))
        ent.fill_(float("nan"))
        stats.masked_fill_(ignored[:, None], 0.0)
        lp.masked_fill_(ignored, 0.0)
        if entropy:
            ent.masked_fill_(ignored, 0.0)
        return lp, ent, stats
    safe = torch.where(ignored, torch.zeros_like(tokens), tokens)
    buf = block_buffer(x) if entropy else None
    for s, work in (row_blocks(x) if scratch else copied_blocks(x)):
        if softcap > 0:
            work.copy_(transform_logits(work, 1.0, softcap))
        if temperature != 1.0:
            work.div_(temperature)
        ref = safe_ref(work.amax(1))
        b_y = work.gather(1, safe[s, None]).squeeze(1)
        d = work.sub_(ref[:, None])
        if entropy:
            e = torch.exp(d.clamp_min_(LOGQ_FLOOR), out=buf[:d.numel()].view(d.shape))
            sum_e = e.sum(1)
            log_s = torch.log(sum_e)
            ent[s] = entropy_from_sums(log_s, e.mul_(d).sum(1), sum_e)
        else:
            log_s = torch.log(d.exp_().sum(1))
        lp[s] = (b_y - ref) - log_s
        stats[s, 0], stats[s, 1] = ref, log_s
    zero = torch.zeros((), dtype=cdt, device=x.device)
    lp = torch.where(ignored, zero, lp)
    ent = torch.where(ignored, zero, ent) if entropy else ent
    return lp, ent, torch.where(ignored[:, None], zero, stats)


def logprobs_backward(x: Tensor, tokens: Tensor, ent: Tensor, stats: Tensor, dlp: Tensor,
                      dent: Optional[Tensor], opts: KLOptions, out: Optional[Tensor] = None) -> Tensor:
    """dL/dx of rows x into ``out`` (x's dtype; may be x itself, then overwritten; a new tensor when
    None), in cache-sized row blocks: with log q = b - ref - log s, q = e^{log q},
    dx = (dlp onehot - q (dlp + dent (log q + H))) / T, through the softcap by ``transform_grad``.
    A row whose token is ``opts.ignore_index`` gets zeros (whatever its upstream gradients; its logits
    finite, as any the torch path reads)."""
    temperature, softcap = opts.temperature, opts.softcap
    cdt = stats.dtype
    out = torch.empty_like(x) if out is None else out
    inplace = out is x
    buf = block_buffer(x) if dent is not None else None
    # an ignored row: all-zero coefficients and a shift of +inf (q = e^{-inf} = 0), so its gradient
    # is 0 x 0 with no masking pass (as linear/chunk_torch.py's skipped rows)
    ignored = tokens == opts.ignore_index
    safe = torch.where(ignored, torch.zeros_like(tokens), tokens)
    zero = torch.zeros((), dtype=cdt, device=x.device)
    g = torch.where(ignored, zero, dlp.to(cdt) / temperature)
    neg_g = torch.where(ignored, zero, -g)
    if dent is not None:
        c1 = torch.where(ignored, zero, dent.to(cdt) / -temperature)
        c0 = torch.where(ignored, zero, -(dent.to(cdt) * ent.to(cdt) + dlp.to(cdt)) / temperature)
    shift = torch.where(ignored, float("inf"), stats[:, 0] + stats[:, 1])
    for s, work in (row_blocks(x) if inplace else copied_blocks(x)):
        z = None
        if softcap > 0:
            z = transform_logits(work, 1.0, softcap)
            work.copy_(z)
        if temperature != 1.0:
            work.div_(temperature)
        logq = work.sub_(shift[s, None])
        if dent is None:
            work = logq.exp_().mul_(neg_g[s, None])
        else:
            q = torch.exp(logq.clamp_min_(LOGQ_FLOOR), out=buf[:logq.numel()].view(logq.shape))
            work = logq.mul_(c1[s, None]).add_(c0[s, None]).mul_(q)
        work.scatter_add_(1, safe[s, None], g[s, None])
        if z is not None:
            work.copy_(transform_grad(work, z, 1.0, softcap))
        if not (inplace and x.dtype == cdt):
            out[s].copy_(work)
    return out
