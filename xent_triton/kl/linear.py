"""Linear forms of the KL family: ``linear_distillation_loss`` and ``linear_token_logprobs``.

Chunked over tokens: per chunk of ``chunk_size`` rows the logits (student and teacher) are formed
by ``torch.mm`` into reused (chunk, C) buffers and the row kernels of ``kl/ops.py`` run on them;
the backward recomputes the chunk's logits, writes their gradient over the student buffer (in
place) and turns it into dX (written per chunk) and dW, db (fp32 accumulators). Nothing N x C
exists beyond one chunk per model.

FLOPs (N tokens, C classes, D / Dt hidden sizes): forward 2 N D C (student) + 2 N Dt C (teacher);
backward recompute 2 N D C + 2 N Dt C, dX 2 N D C, dW 2 N D C. token_logprobs: forward 2 N D C,
backward 6 N D C. The teacher gets no gradient.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union, overload

import torch
from torch import Tensor

from ..linear.chunked import logits_into
from ..options import class_ids, target_range_check
from ..parallel.dtensor import is_dtensor
from ..runtime import compute_dtype, no_second_derivative, upstream_or_zeros
from .chunks import Grads, chunk_rows, rows
from .dtensor import dtensor_linear_distillation_loss, dtensor_linear_token_logprobs
from .functional import check_real, distill_options, reduce_tokens
from .ops import (
    distill_backward_into,
    distill_forward_rows,
    logprobs_backward_into,
    logprobs_forward_rows,
    saved_entropy,
    token_range_check,
)
from .parallel_linear import (
    STUDENT,
    TEACHER,
    check_shard_head,
    vocab_parallel_linear_distillation_rows,
    vocab_parallel_linear_token_logprobs,
)


def needs(ctx, b: Optional[Tensor]) -> tuple[bool, bool, bool]:
    return ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2]


def grads_or_none(grads, need, what: str) -> tuple:
    return tuple(no_second_derivative(g, what) if n else None for g, n in zip(grads, need))


def fake_grads(x: Tensor, w: Tensor, b: Optional[Tensor], need_dx: bool, need_dw: bool,
               need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    return (x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
            w.new_empty(w.shape) if need_dw else x.new_empty((0,)),
            w.new_empty((w.shape[0],)) if need_db else x.new_empty((0,)))


@torch.library.custom_op("xent_triton::linear_distillation_fwd", mutates_args=())
def linear_distillation_fwd(xs: Tensor, ws: Tensor, bs: Optional[Tensor], xt: Tensor, wt: Tensor,
                            bt: Optional[Tensor], labels: Optional[Tensor], divergence: int, beta: float,
                            temperature: float, ignore_index: int, ce_weight: float,
                            chunk: int) -> tuple[Tensor, Tensor]:
    """Per-row (loss, stats) of the logits xs wsᵀ + bs against xt wtᵀ + bt, chunk rows at a time."""
    N, C = xs.shape[0], ws.shape[0]
    if labels is not None:
        target_range_check(labels, C, ignore_index)
    loss = xs.new_empty((N,), dtype=compute_dtype(xs))
    stats = xs.new_empty((N, 8), dtype=compute_dtype(xs))
    zs = xs.new_empty((min(chunk, N), C))
    zt = xt.new_empty((min(chunk, N), C))
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        n = r1 - r0
        logits_into(zs[:n], xs[r0:r1], ws, bs)
        logits_into(zt[:n], xt[r0:r1], wt, bt)
        lo, st = distill_forward_rows(zs[:n], zt[:n], None if labels is None else labels[r0:r1],
                                      divergence, beta, temperature, ignore_index, ce_weight)
        loss[r0:r1] = lo
        stats[r0:r1] = st
    return loss, stats


@linear_distillation_fwd.register_fake
def _(xs, ws, bs, xt, wt, bt, labels, divergence, beta, temperature, ignore_index, ce_weight, chunk):
    N, dt = xs.shape[0], compute_dtype(xs)
    return xs.new_empty((N,), dtype=dt), xs.new_empty((N, 8), dtype=dt)


@torch.library.custom_op("xent_triton::linear_distillation_bwd", mutates_args=())
def linear_distillation_bwd(xs: Tensor, ws: Tensor, bs: Optional[Tensor], xt: Tensor, wt: Tensor,
                            bt: Optional[Tensor], labels: Optional[Tensor], stats: Tensor, dloss: Tensor,
                            divergence: int, beta: float, temperature: float, ignore_index: int,
                            ce_weight: float, chunk: int, need_dx: bool, need_dw: bool,
                            need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dW, db) of the student; (0,) for each one not needed (and db without a bias)."""
    N, C = xs.shape[0], ws.shape[0]
    grads = Grads(xs, ws, need_dx, need_dw, need_db)
    zs = xs.new_empty((min(chunk, N), C))
    zt = xt.new_empty((min(chunk, N), C))
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        n = r1 - r0
        logits_into(zs[:n], xs[r0:r1], ws, bs)
        logits_into(zt[:n], xt[r0:r1], wt, bt)
        distill_backward_into(zs[:n], zs[:n], zt[:n], None if labels is None else labels[r0:r1],
                              stats[r0:r1], dloss[r0:r1], divergence, beta, temperature, ignore_index,
                              ce_weight)
        grads.add_chunk(zs[:n], xs, ws, r0, r1)
    return grads.result(xs)


@linear_distillation_bwd.register_fake
def _(xs, ws, bs, xt, wt, bt, labels, stats, dloss, divergence, beta, temperature, ignore_index,
      ce_weight, chunk, need_dx, need_dw, need_db):
    return fake_grads(xs, ws, bs, need_dx, need_dw, need_db)


def _ld_setup(ctx, inputs, output):
    xs, ws, bs, xt, wt, bt, labels, *flat = inputs
    ctx.save_for_backward(xs, ws, bs, xt, wt, bt, labels, output[1])
    ctx.flat = tuple(flat)
    ctx.mark_non_differentiable(output[1])


def _ld_backward(ctx, dloss, _dstats):
    xs, ws, bs, xt, wt, bt, labels, stats = ctx.saved_tensors
    dloss = upstream_or_zeros(dloss, stats.shape[0], stats.dtype, xs.device)
    need = needs(ctx, bs)
    grads = torch.ops.xent_triton.linear_distillation_bwd(xs, ws, bs, xt, wt, bt, labels, stats, dloss,
                                                           *ctx.flat, *need)
    return grads_or_none(grads, need, "linear_distillation_loss") + (None,) * 10


linear_distillation_fwd.register_autograd(_ld_backward, setup_context=_ld_setup)


def check_head(names: tuple[str, str, str], h: Tensor, w: Tensor,
               b: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``check_shard_head`` for a whole head: at least one class (ValueError naming C otherwise)."""
    h, w, b = check_shard_head(names, h, w, b, classes="C")
    if w.shape[0] == 0:
        raise ValueError(f"{names[1]} has no classes (C = 0)")
    return h, w, b




def linear_distillation_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                             teacher_weight: Tensor, labels: Optional[Tensor] = None, *,
                             student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                             divergence: str = "kl", beta: float = 0.5, temperature: float = 1.0,
                             ignore_index: int = -100, reduction: str = "mean", ce_weight: float = 0.0,
                             empty_batch: str = "nan", chunk_size: Optional[int] = None,
                             process_group: Optional[Any] = None,
                             vocab_start_index: Optional[int] = None) -> Tensor:
    """``distillation_loss(F.linear(student_hidden, student_weight, student_bias),
    F.linear(teacher_hidden, teacher_weight, teacher_bias), labels, ...)`` without the N x C logits.

    Args:
        student_hidden: (..., D); student_weight: (C, D); student_bias: (C,) or None (same dtype).
        teacher_hidden: (..., Dt) with the student's leading shape; teacher_weight: (C, Dt);
            teacher_bias: (C,) or None. The teacher is a constant (detached; no gradient).
        labels, divergence, beta, temperature, ignore_index, reduction, ce_weight, empty_batch: as
            in ``distillation_loss`` (no T**2 factor). Under ``torch.autocast`` each head is cast
            to the autocast dtype as ``F.linear`` does; hidden size 0 gives the bias (or zero)
            logits, as ``F.linear``.
        chunk_size: tokens per chunk (default: about 16M logits per chunk).
        process_group, vocab_start_index: vocabulary parallelism with class-sharded heads
            (``kl/parallel_linear.py``, chunked over tokens as here). DTensor hidden states and
            heads (W ``Shard(0)`` over the classes: vocabulary parallel, ``kl/dtensor.py``).

    Returns:
        The float32 loss (float64 for float64 hidden states); gradients reach student_hidden,
        student_weight and student_bias. FLOPs: see the module docstring.

    Example:
        >>> hs, ws = torch.randn(8, 64, requires_grad=True), torch.randn(1000, 64, requires_grad=True)
        >>> ht, wt = torch.randn(8, 96), torch.randn(1000, 96)
        >>> linear_distillation_loss(hs, ws, ht, wt, divergence="jsd", chunk_size=4).backward()
    """
    dtensor = is_dtensor(student_hidden) or is_dtensor(student_weight)
    if dtensor or process_group is not None or vocab_start_index is not None:
        chosen, error = None, None  # a rank's error is raised after the layout exchange, on every rank
        try:
            chosen = distill_options(divergence, beta, temperature, reduction, ce_weight, labels is not None,
                                     ignore_index, empty_batch)
        except (TypeError, ValueError) as e:
            error = e
        if dtensor:  # the layout comes from the placements (kl/dtensor.py)
            return dtensor_linear_distillation_loss(student_hidden, student_weight, teacher_hidden,
                                                    teacher_weight, labels, student_bias, teacher_bias,
                                                    chosen, chunk_size, error, linear_distillation_loss)
        per_token, lbl = vocab_parallel_linear_distillation_rows(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
            teacher_bias, chosen, process_group, vocab_start_index, error, chunk_size=chunk_size)
        assert chosen is not None  # else the call above raised the error, on every rank
        return reduce_tokens(per_token, lbl, chosen[4], student_hidden.shape[:-1])
    student_hidden, student_weight, student_bias = check_head(STUDENT, student_hidden, student_weight,
                                                              student_bias)
    teacher_hidden, teacher_weight, teacher_bias = check_head(TEACHER, teacher_hidden, teacher_weight,
                                                              teacher_bias)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher heads have different class counts: {student_weight.shape[0]} "
                         f"vs {teacher_weight.shape[0]}")
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"teacher_hidden's leading shape {tuple(teacher_hidden.shape[:-1])} != "
                         f"student_hidden's {tuple(lead)}")
    div, beta, temperature, ce_weight, opts = distill_options(
        divergence, beta, temperature, reduction, ce_weight, labels is not None, ignore_index, empty_batch)
    lbl = None if labels is None else class_ids(labels, lead, "student_hidden's leading shape")
    xs = rows(student_hidden)
    xt = rows(teacher_hidden.detach())
    chunk = chunk_rows(chunk_size, xs.shape[0], student_weight.shape[0])
    loss_rows, _stats = torch.ops.xent_triton.linear_distillation_fwd(
        xs, student_weight, student_bias, xt, teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(), lbl, div, beta, temperature,
        opts.ignore_index, ce_weight, chunk)
    return reduce_tokens(loss_rows, lbl, opts, lead)


# ---------------------------------------------------------------------------------- logprobs
@torch.library.custom_op("xent_triton::linear_token_logprobs_fwd", mutates_args=())
def linear_token_logprobs_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], tokens: Tensor, temperature: float,
                              entropy: bool, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(log-probs, entropy or (0,), stats) of the logits x wᵀ + b, chunk rows at a time."""
    N, C = x.shape[0], w.shape[0]
    token_range_check(tokens, C)
    dt = compute_dtype(x)
    lp, ent, stats = x.new_empty((N,), dtype=dt), x.new_empty((N if entropy else 0,), dtype=dt), \
        x.new_empty((N, 2), dtype=dt)
    z = x.new_empty((min(chunk, N), C))
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        logits_into(z[:r1 - r0], x[r0:r1], w, b)
        lp[r0:r1], e, stats[r0:r1] = logprobs_forward_rows(z[:r1 - r0], tokens[r0:r1], temperature, entropy,
                                                             scratch=True)
        if entropy:
            ent[r0:r1] = e
    return lp, ent, stats


@linear_token_logprobs_fwd.register_fake
def _(x, w, b, tokens, temperature, entropy, chunk):
    N, dt = x.shape[0], compute_dtype(x)
    return (x.new_empty((N,), dtype=dt), x.new_empty((N if entropy else 0,), dtype=dt),
            x.new_empty((N, 2), dtype=dt))


@torch.library.custom_op("xent_triton::linear_token_logprobs_bwd", mutates_args=())
def linear_token_logprobs_bwd(x: Tensor, w: Tensor, b: Optional[Tensor], tokens: Tensor, ent: Tensor,
                              stats: Tensor, dlp: Tensor, dent: Optional[Tensor], temperature: float,
                              chunk: int, need_dx: bool, need_dw: bool,
                              need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dW, db); (0,) for each one not needed (and db without a bias)."""
    N, C = x.shape[0], w.shape[0]
    grads = Grads(x, w, need_dx, need_dw, need_db)
    z = x.new_empty((min(chunk, N), C))
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        zc = z[:r1 - r0]
        logits_into(zc, x[r0:r1], w, b)
        logprobs_backward_into(zc, zc, tokens[r0:r1], ent[r0:r1] if dent is not None else ent,
                               stats[r0:r1], dlp[r0:r1], None if dent is None else dent[r0:r1], temperature)
        grads.add_chunk(zc, x, w, r0, r1)
    return grads.result(x)


@linear_token_logprobs_bwd.register_fake
def _(x, w, b, tokens, ent, stats, dlp, dent, temperature, chunk, need_dx, need_dw, need_db):
    return fake_grads(x, w, b, need_dx, need_dw, need_db)


def _lt_setup(ctx, inputs, output):
    x, w, b, tokens, temperature, entropy, chunk = inputs
    ctx.save_for_backward(x, w, b, tokens, saved_entropy(output[1]), output[2])
    ctx.temperature, ctx.entropy, ctx.chunk = temperature, entropy, chunk
    # an unused output's gradient stays None (entropy logged only: no entropy term in the backward)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[2])


def _lt_backward(ctx, dlp, dent, _dstats):
    x, w, b, tokens, ent, stats = ctx.saved_tensors
    dlp = upstream_or_zeros(dlp, stats.shape[0], stats.dtype, x.device)
    need = needs(ctx, b)
    grads = torch.ops.xent_triton.linear_token_logprobs_bwd(
        x, w, b, tokens, ent, stats, dlp, dent if ctx.entropy else None, ctx.temperature, ctx.chunk, *need)
    return grads_or_none(grads, need, "linear_token_logprobs") + (None,) * 4


linear_token_logprobs_fwd.register_autograd(_lt_backward, setup_context=_lt_setup)


# Typing only: the log-probabilities alone without return_entropy, else they or (logp, entropy).
@overload
def linear_token_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, *, bias: Optional[Tensor] = ...,
                          temperature: float = ..., return_entropy: Literal[False] = ...,
                          chunk_size: Optional[int] = ..., process_group: Optional[Any] = ...,
                          vocab_start_index: Optional[int] = ...) -> Tensor: ...
@overload
def linear_token_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, *, bias: Optional[Tensor] = ...,
                          temperature: float = ..., return_entropy: bool = ...,
                          chunk_size: Optional[int] = ..., process_group: Optional[Any] = ...,
                          vocab_start_index: Optional[int] = ...) -> Union[Tensor, tuple[Tensor, Tensor]]: ...
def linear_token_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, *, bias: Optional[Tensor] = None,
                          temperature: float = 1.0, return_entropy: bool = False,
                          chunk_size: Optional[int] = None, process_group: Optional[Any] = None,
                          vocab_start_index: Optional[int] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``token_logprobs(F.linear(hidden, weight, bias), tokens, ...)`` without the N x C logits.

    Args:
        hidden: (..., D); weight: (C, D); bias: (C,) or None (same dtype; under ``torch.autocast``
            cast to the autocast dtype as ``F.linear`` does); tokens: ids of shape
            ``hidden.shape[:-1]`` in [0, C). temperature, return_entropy: as in ``token_logprobs``.
        chunk_size: tokens per chunk (default: about 16M logits per chunk).
        process_group, vocab_start_index: vocabulary parallelism with a class-sharded head
            (``kl/parallel_linear.py``, chunked over tokens as here). DTensor hidden states and
            head (W ``Shard(0)`` over the classes: vocabulary parallel, ``kl/dtensor.py``).

    Returns:
        float32 log-probs (tokens' shape), or (log-probs, entropy); gradients reach hidden, weight
        and bias (those that require grad: a frozen head allocates no (C, D) buffer). FLOPs:
        forward 2 N D C, backward 6 N D C.

    Example:
        >>> h, W = torch.randn(2, 5, 64, requires_grad=True), torch.randn(1000, 64, requires_grad=True)
        >>> lp = linear_token_logprobs(h, W, torch.randint(0, 1000, (2, 5)), temperature=0.7)
        >>> lp.sum().backward()
    """
    dtensor = is_dtensor(hidden) or is_dtensor(weight)
    if dtensor or process_group is not None or vocab_start_index is not None:
        error = None  # a rank's error is raised after the layout exchange, on every rank
        try:
            temperature = check_real("temperature", temperature, lambda v: v > 0, "a positive finite float")
        except (TypeError, ValueError) as e:
            error = e
        if dtensor:  # the layout comes from the placements (kl/dtensor.py)
            return dtensor_linear_token_logprobs(hidden, weight, tokens, bias, temperature, return_entropy,
                                                 chunk_size, error, linear_token_logprobs)
        return vocab_parallel_linear_token_logprobs(hidden, weight, tokens, bias, temperature, return_entropy,
                                                    process_group, vocab_start_index, error,
                                                    chunk_size=chunk_size)
    hidden, weight, bias = check_head(("hidden", "weight", "bias"), hidden, weight, bias)
    temperature = check_real("temperature", temperature, lambda v: v > 0, "a positive finite float")
    tok = class_ids(tokens, hidden.shape[:-1], "hidden's leading shape")
    x = rows(hidden)
    chunk = chunk_rows(chunk_size, x.shape[0], weight.shape[0])
    lp, ent, _stats = torch.ops.xent_triton.linear_token_logprobs_fwd(x, weight, bias, tok, temperature,
                                                                      bool(return_entropy), chunk)
    shape = hidden.shape[:-1]
    return (lp.view(shape), ent.view(shape)) if return_entropy else lp.view(shape)
