"""Custom ops of the KL family's linear forms (``kl/linear.py``): chunked over tokens, per chunk
of ``chunk_size`` rows the logits (student and teacher) are formed by ``torch.mm`` into reused
(chunk, C) buffers and the row launchers of ``kl/ops.py`` run on them; the backward recomputes the
chunk's logits, writes their gradient over the student buffer (in place) and turns it into dX
(written per chunk) and dW, db (fp32 accumulators; with ``accum_fp32`` off, the head's dtype).
Nothing N x C exists beyond one chunk per model. Each op takes the options as keyword-only
arguments, one per ``KLOptions`` field (``core/op_schema.py``).

Ignored tokens cost no FLOPs (``core/compaction.py``, as the CE linear head): the rows whose label
(distillation; without labels nothing is ignored) or token (log-probs) equals ``ignore_index`` are
compacted away before the GEMMs, in forward and again in backward, and get the constants a kernel
writes for an ignored row: loss 0 and stats (0, -inf, 0, -inf, 0, -inf, 0, 0) (distillation; the
kernels' own, up to reverse_kl's 0/0 ``extra``, NaN there); log-prob 0, entropy 0, stats (0, 0);
gradient rows 0. One host sync per op call (the count of kept rows: the GEMMs need host shapes);
none while torch.compile traces (the ops' fake implementations have fixed output shapes, so
``fullgraph=True, dynamic=True`` traces them once) and none with ``XENT_COMPACT=0``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import Tensor

from ..core.compaction import kept_rows, scatter_rows, take_rows
from ..core.inputs import target_range_check
from ..core.op_schema import input_grads, options_op
from ..core.runtime import compute_dtype, no_second_derivative, upstream_or_zeros
from ..linear.chunk_grads import ChunkGrads
from ..linear.chunked import logits_into
from .ops import (
    distill_backward_into,
    distill_forward_rows,
    logprobs_backward_into,
    logprobs_forward_rows,
    saved_entropy,
)
from .options import KLOptions

CHUNK_LOGITS = 1 << 24  # default chunk: about 16M logits per model buffer


def chunked(opts: KLOptions, N: int, C: int) -> KLOptions:
    """``opts`` with its chunk size resolved (0 = automatic: about CHUNK_LOGITS logits per chunk)."""
    if opts.chunk_size:
        return opts
    return dataclasses.replace(opts, chunk_size=max(1, min(N, CHUNK_LOGITS // max(C, 1))))


class Grads(ChunkGrads):
    """The student's gradient buffers (``linear/chunk_grads.ChunkGrads``), allocated only for what
    autograd asks (a frozen head - LoRA, RL with a fixed head - allocates no (C, D) or (C,) buffer):
    dX in x's dtype, dW and db summed in fp32 / fp64, or with ``accum_fp32`` False
    (``grad_accum_dtype`` = the head's dtype) in the head's dtype."""

    def __init__(self, x: Tensor, w: Tensor, need_dx: bool, need_dw: bool, need_db: bool,
                 accum_fp32: bool = True):
        acc = compute_dtype(x) if accum_fp32 else w.dtype
        super().__init__(x, w, (need_dx, need_dw, need_db), acc, acc)
        self.w = w

    def result(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(dX, dW, db) in the operands' dtypes with a (0,) placeholder for each one not asked for."""
        dx, dw, db = self.done(self.w)
        return (x.new_empty((0,)) if dx is None else dx, x.new_empty((0,)) if dw is None else dw,
                x.new_empty((0,)) if db is None else db.to(self.w.dtype))


def rows(h: Tensor) -> Tensor:
    """(N, D) rows of (..., D) hidden states (D = 0 too, where -1 would be ambiguous)."""
    return h.reshape(h.shape[:-1].numel(), h.shape[-1])


def needs(ctx, b: Optional[Tensor]) -> tuple[bool, bool, bool]:
    return ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2]


def grads_or_none(grads, need, what: str) -> tuple:
    return tuple(no_second_derivative(g, what) if n else None for g, n in zip(grads, need))


def fake_grads(x: Tensor, w: Tensor, b: Optional[Tensor], need_dx: bool, need_dw: bool,
               need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    return (x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
            w.new_empty(w.shape) if need_dw else x.new_empty((0,)),
            w.new_empty((w.shape[0],)) if need_db else x.new_empty((0,)))


IGNORED_DISTILL_STATS = (0.0, float("-inf"), 0.0, float("-inf"), 0.0, float("-inf"), 0.0, 0.0)


def scatter_distill_stats(stats: Tensor, idx: Tensor, n: int) -> Tensor:
    """(n, 8) distillation stats: the kept rows' at ``idx``, an ignored row's constants elsewhere."""
    out = torch.zeros((n, stats.shape[1]), dtype=stats.dtype, device=stats.device)
    for col, v in enumerate(IGNORED_DISTILL_STATS):
        if v != 0.0:
            out[:, col] = v
    return out.index_copy_(0, idx, stats)


def scatter_grads(grads: tuple[Tensor, Tensor, Tensor], idx: Tensor, n: int,
                  need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dW, db) of the kept rows ``idx`` with dX (if needed) scattered back to ``n`` rows (0 on
    the skipped ones)."""
    dx, dw, db = grads
    return (scatter_rows(dx, idx, n) if need_dx else dx), dw, db


STUDENT_ARGS = "Tensor xs, Tensor ws, Tensor? bs, Tensor xt, Tensor wt, Tensor? bt, Tensor? labels"
NEEDS = "bool need_dx, bool need_dw, bool need_db"


@options_op("xent_triton::linear_distillation_fwd", STUDENT_ARGS, "(Tensor, Tensor)", options_cls=KLOptions)
def linear_distillation_fwd(xs: Tensor, ws: Tensor, bs: Optional[Tensor], xt: Tensor, wt: Tensor,
                            bt: Optional[Tensor], labels: Optional[Tensor],
                            **options: Any) -> tuple[Tensor, Tensor]:
    """Per-row (loss, stats) of the logits xs wsᵀ + bs against xt wtᵀ + bt, chunk_size rows at a
    time (the options' ``chunk_size``, resolved by ``chunked``)."""
    opts = KLOptions.from_flat(**options)
    if labels is not None:
        target_range_check(labels, ws.shape[0], opts.ignore_index)
    idx = None if labels is None else kept_rows(labels != opts.ignore_index)
    if idx is None:
        return distill_chunks(xs, ws, bs, xt, wt, bt, labels, opts)
    loss, stats = distill_chunks(take_rows(xs, idx), ws, bs, take_rows(xt, idx), wt, bt,
                                 take_rows(labels, idx), opts)
    N = xs.shape[0]
    return scatter_rows(loss, idx, N), scatter_distill_stats(stats, idx, N)


def distill_chunks(xs: Tensor, ws: Tensor, bs: Optional[Tensor], xt: Tensor, wt: Tensor, bt: Optional[Tensor],
                   labels: Optional[Tensor], opts: KLOptions) -> tuple[Tensor, Tensor]:
    """The forward's chunk loop over every row given."""
    N, C, chunk = xs.shape[0], ws.shape[0], opts.chunk_size
    loss = xs.new_empty((N,), dtype=compute_dtype(xs))
    stats = xs.new_empty((N, 8), dtype=compute_dtype(xs))
    zs = xs.new_empty((min(chunk, N), C))
    zt = xt.new_empty((min(chunk, N), C))
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        n = r1 - r0
        logits_into(zs[:n], xs[r0:r1], ws, bs)
        logits_into(zt[:n], xt[r0:r1], wt, bt)
        lo, st = distill_forward_rows(zs[:n], zt[:n], None if labels is None else labels[r0:r1], opts)
        loss[r0:r1] = lo
        stats[r0:r1] = st
    return loss, stats


@linear_distillation_fwd.register_fake
def _(xs, ws, bs, xt, wt, bt, labels, **options):
    N, dt = xs.shape[0], compute_dtype(xs)
    return xs.new_empty((N,), dtype=dt), xs.new_empty((N, 8), dtype=dt)


@options_op("xent_triton::linear_distillation_bwd", f"{STUDENT_ARGS}, Tensor stats, Tensor dloss, {NEEDS}",
            "(Tensor, Tensor, Tensor)", options_cls=KLOptions)
def linear_distillation_bwd(xs: Tensor, ws: Tensor, bs: Optional[Tensor], xt: Tensor, wt: Tensor,
                            bt: Optional[Tensor], labels: Optional[Tensor], stats: Tensor, dloss: Tensor,
                            need_dx: bool, need_dw: bool, need_db: bool,
                            **options: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dW, db) of the student; (0,) for each one not needed (and db without a bias)."""
    opts = KLOptions.from_flat(**options)
    need = (need_dx, need_dw, need_db)
    idx = None if labels is None or not any(need) else kept_rows(labels != opts.ignore_index)
    if idx is None:
        return distill_grads(xs, ws, bs, xt, wt, bt, labels, stats, dloss, need, opts)
    return scatter_grads(distill_grads(take_rows(xs, idx), ws, bs, take_rows(xt, idx), wt, bt,
                                       take_rows(labels, idx), take_rows(stats, idx), take_rows(dloss, idx),
                                       need, opts), idx, xs.shape[0], need_dx)


def distill_grads(xs: Tensor, ws: Tensor, bs: Optional[Tensor], xt: Tensor, wt: Tensor, bt: Optional[Tensor],
                  labels: Optional[Tensor], stats: Tensor, dloss: Tensor, need: tuple[bool, bool, bool],
                  opts: KLOptions) -> tuple[Tensor, Tensor, Tensor]:
    """The backward's chunk loop over every row given."""
    N, C, chunk = xs.shape[0], ws.shape[0], opts.chunk_size
    grads = Grads(xs, ws, *need, opts.accum_fp32)
    zs = xs.new_empty((min(chunk, N), C))
    zt = xt.new_empty((min(chunk, N), C))
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        n = r1 - r0
        logits_into(zs[:n], xs[r0:r1], ws, bs)
        logits_into(zt[:n], xt[r0:r1], wt, bt)
        distill_backward_into(zs[:n], zs[:n], zt[:n], None if labels is None else labels[r0:r1],
                              stats[r0:r1], dloss[r0:r1], opts)
        grads.add(zs[:n], xs, ws, r0, r1)
    return grads.result(xs)


@linear_distillation_bwd.register_fake
def _(xs, ws, bs, xt, wt, bt, labels, stats, dloss, need_dx, need_dw, need_db, **options):
    return fake_grads(xs, ws, bs, need_dx, need_dw, need_db)


def _ld_setup(ctx, inputs, keyword_only_inputs, output):
    xs, ws, bs, xt, wt, bt, labels = inputs
    ctx.save_for_backward(xs, ws, bs, xt, wt, bt, labels, output[1])
    ctx.opts = KLOptions.from_flat(**keyword_only_inputs)
    ctx.mark_non_differentiable(output[1])


def _ld_backward(ctx, dloss, _dstats):
    xs, ws, bs, xt, wt, bt, labels, stats = ctx.saved_tensors
    dloss = upstream_or_zeros(dloss, stats.shape[0], stats.dtype, xs.device)
    need = needs(ctx, bs)
    grads = torch.ops.xent_triton.linear_distillation_bwd(xs, ws, bs, xt, wt, bt, labels, stats, dloss,
                                                           *need, **ctx.opts.flat())
    return input_grads(ctx, *grads_or_none(grads, need, "linear_distillation_loss"))


linear_distillation_fwd.register_autograd(_ld_backward, setup_context=_ld_setup)


def linear_distillation_rows(xs: Tensor, ws: Tensor, bs: Optional[Tensor], xt: Tensor, wt: Tensor,
                             bt: Optional[Tensor], labels: Optional[Tensor], opts: KLOptions) -> Tensor:
    """Per-row loss of the (N, D) student rows against the teacher's through
    ``linear_distillation_fwd`` (differentiable in the student; the options flattened here, at
    the schema; chunk size resolved)."""
    opts = chunked(opts, xs.shape[0], ws.shape[0])
    return torch.ops.xent_triton.linear_distillation_fwd(xs, ws, bs, xt, wt, bt, labels, **opts.flat())[0]


LOGPROBS_ARGS = "Tensor x, Tensor w, Tensor? b, Tensor tokens"


@options_op("xent_triton::linear_token_logprobs_fwd", LOGPROBS_ARGS, "(Tensor, Tensor, Tensor)",
            options_cls=KLOptions)
def linear_token_logprobs_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], tokens: Tensor,
                              **options: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(log-probs, entropy or (0,), stats) of the logits x wᵀ + b, chunk_size rows at a time."""
    opts = KLOptions.from_flat(**options)
    target_range_check(tokens, w.shape[0], opts.ignore_index)
    idx = kept_rows(tokens != opts.ignore_index)
    if idx is None:
        return logprobs_chunks(x, w, b, tokens, opts)
    lp, ent, stats = logprobs_chunks(take_rows(x, idx), w, b, take_rows(tokens, idx), opts)
    N = x.shape[0]
    return (scatter_rows(lp, idx, N), scatter_rows(ent, idx, N) if opts.return_entropy else ent,
            scatter_rows(stats, idx, N))


def logprobs_chunks(x: Tensor, w: Tensor, b: Optional[Tensor], tokens: Tensor,
                    opts: KLOptions) -> tuple[Tensor, Tensor, Tensor]:
    """The forward's chunk loop over every row given."""
    N, C, chunk, entropy = x.shape[0], w.shape[0], opts.chunk_size, opts.return_entropy
    dt = compute_dtype(x)
    lp, ent, stats = x.new_empty((N,), dtype=dt), x.new_empty((N if entropy else 0,), dtype=dt), \
        x.new_empty((N, 2), dtype=dt)
    z = x.new_empty((min(chunk, N), C))
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        logits_into(z[:r1 - r0], x[r0:r1], w, b)
        lp[r0:r1], e, stats[r0:r1] = logprobs_forward_rows(z[:r1 - r0], tokens[r0:r1], opts, scratch=True)
        if entropy:
            ent[r0:r1] = e
    return lp, ent, stats


@linear_token_logprobs_fwd.register_fake
def _(x, w, b, tokens, **options):
    N, dt = x.shape[0], compute_dtype(x)
    return (x.new_empty((N,), dtype=dt), x.new_empty((N if options["return_entropy"] else 0,), dtype=dt),
            x.new_empty((N, 2), dtype=dt))


@options_op("xent_triton::linear_token_logprobs_bwd",
            f"{LOGPROBS_ARGS}, Tensor ent, Tensor stats, Tensor dlp, Tensor? dent, {NEEDS}",
            "(Tensor, Tensor, Tensor)", options_cls=KLOptions)
def linear_token_logprobs_bwd(x: Tensor, w: Tensor, b: Optional[Tensor], tokens: Tensor, ent: Tensor,
                              stats: Tensor, dlp: Tensor, dent: Optional[Tensor], need_dx: bool,
                              need_dw: bool, need_db: bool, **options: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dW, db); (0,) for each one not needed (and db without a bias)."""
    opts = KLOptions.from_flat(**options)
    need = (need_dx, need_dw, need_db)
    idx = kept_rows(tokens != opts.ignore_index) if any(need) else None
    if idx is None:
        return logprobs_grads(x, w, b, tokens, ent, stats, dlp, dent, need, opts)
    ent = take_rows(ent, idx) if dent is not None else ent  # read only with an entropy gradient
    return scatter_grads(logprobs_grads(take_rows(x, idx), w, b, take_rows(tokens, idx), ent,
                                        take_rows(stats, idx), take_rows(dlp, idx), take_rows(dent, idx),
                                        need, opts), idx, x.shape[0], need_dx)


def logprobs_grads(x: Tensor, w: Tensor, b: Optional[Tensor], tokens: Tensor, ent: Tensor, stats: Tensor,
                   dlp: Tensor, dent: Optional[Tensor], need: tuple[bool, bool, bool],
                   opts: KLOptions) -> tuple[Tensor, Tensor, Tensor]:
    """The backward's chunk loop over every row given."""
    N, C, chunk = x.shape[0], w.shape[0], opts.chunk_size
    grads = Grads(x, w, *need, opts.accum_fp32)
    z = x.new_empty((min(chunk, N), C))
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        zc = z[:r1 - r0]
        logits_into(zc, x[r0:r1], w, b)
        logprobs_backward_into(zc, zc, tokens[r0:r1], ent[r0:r1] if dent is not None else ent,
                               stats[r0:r1], dlp[r0:r1], None if dent is None else dent[r0:r1], opts)
        grads.add(zc, x, w, r0, r1)
    return grads.result(x)


@linear_token_logprobs_bwd.register_fake
def _(x, w, b, tokens, ent, stats, dlp, dent, need_dx, need_dw, need_db, **options):
    return fake_grads(x, w, b, need_dx, need_dw, need_db)


def _lt_setup(ctx, inputs, keyword_only_inputs, output):
    x, w, b, tokens = inputs
    ctx.save_for_backward(x, w, b, tokens, saved_entropy(output[1]), output[2])
    ctx.opts = KLOptions.from_flat(**keyword_only_inputs)
    # an unused output's gradient stays None (entropy logged only: no entropy term in the backward)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[2])


def _lt_backward(ctx, dlp, dent, _dstats):
    x, w, b, tokens, ent, stats = ctx.saved_tensors
    dlp = upstream_or_zeros(dlp, stats.shape[0], stats.dtype, x.device)
    need = needs(ctx, b)
    grads = torch.ops.xent_triton.linear_token_logprobs_bwd(
        x, w, b, tokens, ent, stats, dlp, dent if ctx.opts.return_entropy else None, *need, **ctx.opts.flat())
    return input_grads(ctx, *grads_or_none(grads, need, "linear_token_logprobs"))


linear_token_logprobs_fwd.register_autograd(_lt_backward, setup_context=_lt_setup)


def linear_logprobs_rows(x: Tensor, w: Tensor, b: Optional[Tensor], tokens: Tensor,
                         opts: KLOptions) -> tuple[Tensor, Tensor, Tensor]:
    """(log-probs, entropy or (0,), stats (ref, log s)) of the (N, D) rows x against the head (w, b)
    through ``linear_token_logprobs_fwd`` (differentiable; the options flattened here, at the
    schema; chunk size resolved)."""
    opts = chunked(opts, x.shape[0], w.shape[0])
    return torch.ops.xent_triton.linear_token_logprobs_fwd(x, w, b, tokens, **opts.flat())


