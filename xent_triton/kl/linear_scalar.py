"""``linear_distillation_loss`` with a scalar loss (reduction ``mean`` / ``sum``): the student's
gradients formed in forward, as the CE linear head's token-chunked path
(``linear/chunked.py::token_chunks``), by the custom op ``xent_triton::linear_distillation_scalar``.

Per chunk of the kept tokens (labels equal to ``ignore_index`` compacted away first,
``core/compaction.py``, as the per-row ops of ``kl/linear_ops.py``), in one reused (rows, C)
buffer per model, logits in the hidden states' dtype::

    Zs_c = Xs_c Wsᵀ (+ bs) ; Zt_c = Xt_c Wtᵀ (+ bt)    GEMMs  2 n D C + 2 n Dt C
    (Zs_c, Zt_c) -> loss rows, stats                  kl/ops.distill_forward_rows
    Zs_c -> dZ_c  (in place; upstream tw_r / den)     kl/ops.distill_backward_into
    dX_c = dZ_c Ws ; dW (=|+=) dZ_cᵀ Xs_c ; db += sum  GEMMs  2 n D C + 2 n D C

FLOPs: student 6 N D C + teacher 2 N Dt C, times (1 - f) with a fraction f of ignored tokens
(the per-row ops, which recompute both heads' logits in backward: 8 N D C + 4 N Dt C). Every FLOP
is in a vendor GEMM. ``den`` is the mean's denominator as ``kl/functional.reduce_tokens`` forms
it (the valid tokens, times their token weights; ``empty_batch`` guarded), a device value: no host
sync; 1 for a sum. A mean over no weight: the loss is NaN (``empty_batch="nan"``) or 0, the
gradients 0. The loss is ``reduce_tokens`` of the per-row losses, as on the per-row path.

dW: one chunk (every kept token fits the chunk): ONE GEMM written in the head's dtype, no fp32
accumulator (as ``token_chunks``); several: an fp32 (float64) accumulator with ``accum_fp32``,
else the head's dtype (``grad_accum_dtype``), rounded into the head's dtype at the end. Backward
multiplies the saved dX, dW, db by the upstream gradient g (``linear/ops.scaled``: in place where
the dtype matches); a second derivative raises (``no_second_derivative`` anchored on the saved
outputs). Deterministic: no atomics, fixed chunk order.

Not served here (``kl/linear.py`` keeps the per-row ops of ``kl/linear_ops.py``): reduction
``none`` (per-token upstream gradients), a ``token_weight`` that requires grad, a call that needs
no gradient (``torch.no_grad``, every student leaf frozen: the per-row forward does 2 N D C +
2 N Dt C), the class-sharded (``process_group``) and DTensor paths. torch.compile traces this op
(fixed output shapes; the compaction's one host sync runs inside it, none while tracing).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..core.compaction import kept_rows, scatter_rows, take_rows
from ..core.inputs import target_range_check
from ..core.op_schema import input_grads, options_op
from ..core.reduction import guard_empty, weight_sums
from ..core.runtime import alloc, compute_dtype, no_second_derivative
from ..linear.chunk_grads import ChunkGrads
from ..linear.chunked import accumulator_bytes, logits_into
from ..linear.ops import scaled
from .functional import reduce_tokens
from .linear_ops import CHUNK_LOGITS
from .ops import distill_backward_into, distill_forward_rows
from .options import KLOptions

WHAT = "linear_distillation_loss"


def scalar_rows(n: int, C: int, D: int, xs: Tensor, xt: Tensor, chunk_size: int, acc_bytes: int) -> int:
    """Rows per token chunk over ``n`` kept rows: ``chunk_size`` if set; else about CHUNK_LOGITS
    logits per model buffer (``linear_ops.chunked``), or all n rows in ONE chunk when both buffers
    for n rows are at most those for the automatic chunk plus the fp32 dW accumulator one chunk
    does without (C D ``acc_bytes``: ``linear/chunked.accumulator_bytes``, 0 for a frozen head or a
    dW summed in the head's dtype): one chunk never raises the peak (``linear/chunked.token_rows``)."""
    if chunk_size:
        return max(1, min(n, int(chunk_size)))
    rows = max(1, CHUNK_LOGITS // max(C, 1))
    if rows >= n:
        return max(1, n)
    per_row = C * (xs.element_size() + xt.element_size())
    return n if n * per_row <= rows * per_row + C * D * acc_bytes else rows


def mean_scale(valid: Tensor, tw: Optional[Tensor], opts: KLOptions, dtype: torch.dtype) -> Tensor:
    """0-d 1 / den of a mean (0 where den = 0: zero gradients, as torch), 1 for a sum; den as
    ``reduce_tokens`` (``weight_sums`` of the valid flags and token weights, ``guard_empty``)."""
    if opts.reduction != "mean":
        return torch.ones((), dtype=dtype, device=valid.device)
    den, _ = weight_sums(valid.to(dtype), valid, tw)
    den = guard_empty(den, opts)
    return torch.where(den == 0, torch.zeros_like(den), 1.0 / den)


def scalar_loss_and_grads(xs: Tensor, ws: Tensor, bs: Optional[Tensor], xt: Tensor, wt: Tensor,
                          bt: Optional[Tensor], labels: Optional[Tensor], tw: Optional[Tensor],
                          need: tuple[bool, bool, bool], opts: KLOptions):
    """(reduced loss 0-d, dX (N, D), dW (C, D) in ws's dtype, db (C,) in the compute dtype) for an
    upstream gradient of 1; None for a gradient not needed. Ignored rows compacted away first."""
    N, D = xs.shape
    cdt = compute_dtype(xs)
    valid = torch.ones((N,), dtype=torch.bool, device=xs.device) if labels is None \
        else labels != opts.ignore_index
    twc = tw.to(cdt) if tw is not None else None
    inv = mean_scale(valid, twc, opts, cdt)
    idx = None if labels is None else kept_rows(valid)
    xk, tk, lk, twk = take_rows(xs, idx), take_rows(xt, idx), take_rows(labels, idx), take_rows(twc, idx)
    dloss = inv.expand(xk.shape[0]) if twk is None else twk * inv
    loss_k, dx, dw, db = scalar_chunks(xk, ws, bs, tk, wt, bt, lk, dloss, need, opts)
    loss_rows = loss_k if idx is None else scatter_rows(loss_k, idx, N)
    if idx is not None and dx is not None:
        dx = scatter_rows(dx, idx, N)
    return reduce_tokens(loss_rows, labels, opts, (N,), tw), dx, dw, db


def scalar_chunks(xs: Tensor, ws: Tensor, bs: Optional[Tensor], xt: Tensor, wt: Tensor, bt: Optional[Tensor],
                  labels: Optional[Tensor], dloss: Tensor, need: tuple[bool, bool, bool], opts: KLOptions):
    """The chunk loop over every row given: (loss rows, dX, dW, db) (module docstring)."""
    n, D = xs.shape
    C = ws.shape[0]
    cdt, dev = compute_dtype(xs), xs.device
    rows = scalar_rows(n, C, D, xs, xt, opts.chunk_size, accumulator_bytes(need[1], opts.accum_fp32, ws, xs))
    loss = alloc((n,), cdt, dev)
    grads = ChunkGrads(xs, ws, need, cdt if opts.accum_fp32 and rows < n else ws.dtype, cdt)
    zs = xs.new_empty((min(rows, n), C))
    zt = xt.new_empty((min(rows, n), C))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        s, t = zs[:r1 - r0], zt[:r1 - r0]
        lab = None if labels is None else labels[r0:r1]
        logits_into(s, xs[r0:r1], ws, bs)
        logits_into(t, xt[r0:r1], wt, bt)
        lo, st = distill_forward_rows(s, t, lab, opts)
        loss[r0:r1] = lo
        distill_backward_into(s, s, t, lab, st, dloss[r0:r1], opts)  # s now holds dZ
        grads.add(s, xs, ws, r0, r1)
    del zs, zt
    dx, dw, db = grads.done(ws)
    return loss, dx, dw, db


SCALAR_ARGS = ("Tensor xs, Tensor ws, Tensor? bs, Tensor xt, Tensor wt, Tensor? bt, Tensor? labels, "
               "Tensor? token_weight, bool need_dx, bool need_dw, bool need_db")


@options_op("xent_triton::linear_distillation_scalar", SCALAR_ARGS, "(Tensor, Tensor, Tensor, Tensor)",
            options_cls=KLOptions)
def linear_distillation_scalar(xs: Tensor, ws: Tensor, bs: Optional[Tensor], xt: Tensor, wt: Tensor,
                               bt: Optional[Tensor], labels: Optional[Tensor], token_weight: Optional[Tensor],
                               need_dx: bool, need_dw: bool, need_db: bool,
                               **options: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss 0-d, dX, dW, db): the reduced mean / sum loss and the student's gradients for an
    upstream gradient of 1 (an empty (0,) tensor for each one not needed; db in the compute
    dtype). Out-of-range labels raise IndexError here on CPU."""
    opts = KLOptions.from_flat(**options)
    if labels is not None:
        target_range_check(labels, ws.shape[0], opts.ignore_index)
    loss, *grads = scalar_loss_and_grads(xs, ws, bs, xt, wt, bt, labels, token_weight,
                                         (need_dx, need_dw, need_db), opts)
    empty = xs.new_empty((0,))
    return (loss, *(g if g is not None else empty.clone() for g in grads))


@linear_distillation_scalar.register_fake
def _(xs, ws, bs, xt, wt, bt, labels, token_weight, need_dx, need_dw, need_db, **options):
    cdt = compute_dtype(xs)
    return (xs.new_empty((), dtype=cdt), xs.new_empty(xs.shape) if need_dx else xs.new_empty((0,)),
            ws.new_empty(ws.shape) if need_dw else xs.new_empty((0,)),
            xs.new_empty((ws.shape[0],), dtype=cdt) if need_db else xs.new_empty((0,)))


def _scalar_setup(ctx, inputs, keyword_only_inputs, output):
    xs, ws, bs = inputs[:3]
    ctx.save_for_backward(*output[1:])
    ctx.dtypes = (xs.dtype, ws.dtype, bs.dtype if bs is not None else None)
    ctx.need = tuple(inputs[8:11])
    # dX, dW, db stay differentiable outputs (as linear/ops.linear_cross_entropy_chunked): saved,
    # they link a create_graph backward to the leaves, where the raising node of a second
    # derivative sits. Unused, they cost nothing (grads not materialised).
    ctx.set_materialize_grads(False)


def _scalar_backward(ctx, g, *_):
    """dX, dW, db = saved x g (0-d device tensor: no host sync), in the leaves' dtypes."""
    if g is None:  # the loss took no gradient
        return input_grads(ctx)
    grads = []
    for t, dt, n in zip(ctx.saved_tensors, ctx.dtypes, ctx.need):
        if not n:
            grads.append(None)
            continue
        with torch.no_grad():  # detached: scaled in place (shared version counter), no graph
            value = scaled(t.detach(), g, dt)
        grads.append(no_second_derivative(value, WHAT, anchor=t))
    return input_grads(ctx, *grads)  # the teacher, labels, token_weight: no gradient here


linear_distillation_scalar.register_autograd(_scalar_backward, setup_context=_scalar_setup)


def grads_needed(x: Tensor, w: Tensor, b: Optional[Tensor]) -> tuple[bool, bool, bool]:
    """Which of the student's (input, weight, bias) autograd asks for (none under no_grad)."""
    on = torch.is_grad_enabled()
    return on and x.requires_grad, on and w.requires_grad, on and b is not None and b.requires_grad


def serves(opts: KLOptions, need: tuple[bool, bool, bool], token_weight: Optional[Tensor]) -> bool:
    """True when this path serves the call (module docstring: a scalar loss, a gradient needed,
    no gradient for ``token_weight``)."""
    tw_grad = token_weight is not None and token_weight.requires_grad and torch.is_grad_enabled()
    return opts.reduction != "none" and any(need) and not tw_grad


def linear_distillation_scalar_loss(xs: Tensor, ws: Tensor, bs: Optional[Tensor], xt: Tensor, wt: Tensor,
                                    bt: Optional[Tensor], labels: Optional[Tensor],
                                    token_weight: Optional[Tensor], need: tuple[bool, bool, bool],
                                    opts: KLOptions) -> Tensor:
    """The reduced loss of the (N, D) student rows against the teacher's with autograd, through
    ``xent_triton::linear_distillation_scalar`` (the teacher detached by the caller)."""
    out = torch.ops.xent_triton.linear_distillation_scalar(xs, ws, bs, xt, wt, bt, labels, token_weight,
                                                           *need, **opts.flat())
    return out[0]
