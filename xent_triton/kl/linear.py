"""Linear forms of the KL family: ``linear_distillation_loss`` and ``linear_token_logprobs`` (their
custom ops: ``kl/linear_ops.py``). Chunked over tokens: per chunk of ``chunk_size`` rows the logits
(student and teacher) are formed by ``torch.mm`` into reused (chunk, C) buffers and the row kernels
of ``kl/ops.py`` run on them; the backward recomputes the chunk's logits, writes their gradient
over the student buffer (in place) and turns it into dX (written per chunk) and dW, db (fp32
accumulators). Nothing N x C exists beyond one chunk per model.

FLOPs (N tokens, C classes, D / Dt hidden sizes): forward 2 N D C (student) + 2 N Dt C (teacher);
backward recompute 2 N D C + 2 N Dt C, dX 2 N D C, dW 2 N D C. ``linear_distillation_loss`` with
reduction mean / sum on one device: student 6 N D C + teacher 2 N Dt C, the gradients formed in
forward (``kl/linear_scalar.py``). token_logprobs: forward 2 N D C, backward 6 N D C. The teacher
gets no gradient. Ignored tokens (``ignore_index``) are compacted away first: each count scales by
the kept fraction (``core/compaction.py``; one host sync per op call: the forward, and the
recompute backward where there is one).
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union, overload

import torch
from torch import Tensor

from ..core.dtensor import is_dtensor, placement_layout_error
from ..core.inputs import class_ids
from ..core.renames import renamed_keywords
from .dtensor import dtensor_linear_distillation_loss, dtensor_linear_token_logprobs
from .functional import deferred_kl, reduce_tokens
from .linear_ops import linear_distillation_rows, linear_logprobs_rows, rows
from .linear_scalar import grads_needed, linear_distillation_scalar_loss, serves
from .names import LINEAR_DISTILL, LINEAR_LOGPROBS
from .options import make_kl
from .parallel_linear import (
    STUDENT,
    TEACHER,
    check_shard_head,
    vocab_parallel_linear_distillation_rows,
    vocab_parallel_linear_token_logprobs,
)
from .weights import agree_token_weight, check_token_weight, parallel_token_weight, weighted, weighted_outputs


def check_head(names: tuple[str, str, str], h: Tensor, w: Tensor,
               b: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``check_shard_head`` for a whole head: at least one class (ValueError naming C otherwise)."""
    h, w, b = check_shard_head(names, h, w, b, classes="C")
    if w.shape[0] == 0:
        raise ValueError(f"{names[1]} has no classes (C = 0)")
    return h, w, b




@renamed_keywords(**LINEAR_DISTILL)
def linear_distillation_loss(input: Tensor, linear_weight: Tensor, teacher_input: Tensor,
                             teacher_linear_weight: Tensor, target: Optional[Tensor] = None, *,
                             linear_bias: Optional[Tensor] = None,
                             teacher_linear_bias: Optional[Tensor] = None,
                             divergence: str = "kl", beta: float = 0.5, temperature: float = 1.0,
                             ignore_index: int = -100, reduction: str = "mean", ce_weight: float = 0.0,
                             empty_batch: str = "nan", softcap: Optional[float] = None,
                             token_weight: Optional[Tensor] = None, chunk_size: Optional[int] = None,
                             grad_accum_dtype: Optional[torch.dtype] = None,
                             process_group: Optional[Any] = None,
                             vocab_start_index: Optional[int] = None) -> Tensor:
    """``distillation_loss(F.linear(input, linear_weight, linear_bias),
    F.linear(teacher_input, teacher_linear_weight, teacher_linear_bias), target, ...)`` without the
    N x C logits.

    Args:
        input: (..., D); linear_weight: (C, D); linear_bias: (C,) or None (same dtype).
        teacher_input: (..., Dt) with the student's leading shape; teacher_linear_weight: (C, Dt);
            teacher_linear_bias: (C,) or None. The teacher is a constant (detached; no gradient).
        target, divergence, beta, temperature, ignore_index, reduction, ce_weight, empty_batch,
            softcap (both heads' logits capped before the temperature), token_weight: as in
            ``distillation_loss`` (no T**2 factor). Under ``torch.autocast`` each head is cast
            to the autocast dtype as ``F.linear`` does; hidden size 0 gives the bias (or zero)
            logits, as ``F.linear``.
        chunk_size: tokens per chunk (default: about 16M logits per chunk).
        grad_accum_dtype: as in ``linear_cross_entropy``: dW / db summed across token chunks in
            fp32 (None, torch.float32; float64 heads in float64) or in ``linear_weight.dtype``
            (less memory, rounding per chunk); any other dtype raises ValueError (on every rank
            under ``process_group`` / DTensor; the class-sharded paths accumulate their shard alike).
        process_group, vocab_start_index: vocabulary parallelism with class-sharded heads
            (``kl/parallel_linear.py``, chunked over tokens as here; softcap / token_weight as
            here, agreed on by every rank). DTensor hidden states and heads (W ``Shard(0)`` over
            the classes: vocabulary parallel, ``kl/dtensor.py``).

    Returns:
        The float32 loss (float64 for float64 hidden states); gradients reach input,
        linear_weight and linear_bias. FLOPs: see the module docstring.

    Example:
        >>> hs, ws = torch.randn(8, 64, requires_grad=True), torch.randn(1000, 64, requires_grad=True)
        >>> ht, wt = torch.randn(8, 96), torch.randn(1000, 96)
        >>> linear_distillation_loss(hs, ws, ht, wt, divergence="jsd", chunk_size=4).backward()
    """
    options: dict[str, Any] = dict(
                   divergence=divergence, beta=beta, temperature=temperature, ce_weight=ce_weight,
                   has_target=target is not None, ignore_index=ignore_index, reduction=reduction,
                   empty_batch=empty_batch, softcap=softcap, chunk_size=chunk_size,
                   has_token_weight=token_weight is not None, grad_accum_dtype=grad_accum_dtype,
                   weight_dtype=linear_weight.dtype)
    dtensor = is_dtensor(input) or is_dtensor(linear_weight)
    if dtensor or process_group is not None or vocab_start_index is not None:
        opts, error = deferred_kl(**options)  # a rank's error is raised after the exchange, on every rank
        if dtensor:  # the layout comes from the placements (kl/dtensor.py)
            error = error or placement_layout_error(process_group, vocab_start_index,
                                                    "linear_distillation_loss")
            return dtensor_linear_distillation_loss(input, linear_weight, teacher_input,
                                                    teacher_linear_weight, target, linear_bias,
                                                    teacher_linear_bias, opts, error,
                                                    linear_distillation_loss, token_weight)
        tw, error = parallel_token_weight(token_weight, input, error)
        per_token, lbl = vocab_parallel_linear_distillation_rows(
            input, linear_weight, teacher_input, teacher_linear_weight, target, linear_bias,
            teacher_linear_bias, opts, process_group, vocab_start_index, error)
        assert opts is not None  # else the call above raised the error, on every rank
        return reduce_tokens(per_token, lbl, opts, input.shape[:-1], tw)
    input, linear_weight, linear_bias = check_head(STUDENT, input, linear_weight, linear_bias)
    teacher_input, teacher_linear_weight, teacher_linear_bias = check_head(
        TEACHER, teacher_input, teacher_linear_weight, teacher_linear_bias)
    if linear_weight.shape[0] != teacher_linear_weight.shape[0]:
        raise ValueError(f"student and teacher heads have different class counts: {linear_weight.shape[0]} "
                         f"vs {teacher_linear_weight.shape[0]}")
    lead = input.shape[:-1]
    if teacher_input.shape[:-1] != lead:
        raise ValueError(f"teacher_input's leading shape {tuple(teacher_input.shape[:-1])} != "
                         f"input's {tuple(lead)}")
    opts = make_kl(**options)
    lbl = None if target is None else class_ids(target, lead, "input's leading shape")
    tw = check_token_weight(token_weight, lead, input.device)
    xs = rows(input)
    xt = rows(teacher_input.detach())
    bt = None if teacher_linear_bias is None else teacher_linear_bias.detach()
    need = grads_needed(input, linear_weight, linear_bias)
    if serves(opts, need, tw):  # mean / sum: gradients formed in forward (kl/linear_scalar.py)
        return linear_distillation_scalar_loss(xs, linear_weight, linear_bias, xt,
                                               teacher_linear_weight.detach(), bt, lbl, tw, need, opts)
    loss_rows = linear_distillation_rows(xs, linear_weight, linear_bias, xt, teacher_linear_weight.detach(),
                                         bt, lbl, opts)
    return reduce_tokens(loss_rows, lbl, opts, lead, tw)


# ---------------------------------------------------------------------------------- logprobs
# Typing only: the log-probabilities alone without return_entropy, else they or (logp, entropy).
@overload
def linear_token_logprobs(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                          linear_bias: Optional[Tensor] = ..., temperature: float = ...,
                          return_entropy: Literal[False] = ..., ignore_index: int = ...,
                          softcap: Optional[float] = ...,
                          token_weight: Optional[Tensor] = ..., chunk_size: Optional[int] = ...,
                          grad_accum_dtype: Optional[torch.dtype] = ..., process_group: Optional[Any] = ...,
                          vocab_start_index: Optional[int] = ...) -> Tensor: ...
@overload
def linear_token_logprobs(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                          linear_bias: Optional[Tensor] = ..., temperature: float = ...,
                          return_entropy: bool = ..., ignore_index: int = ...,
                          softcap: Optional[float] = ...,
                          token_weight: Optional[Tensor] = ..., chunk_size: Optional[int] = ...,
                          grad_accum_dtype: Optional[torch.dtype] = ..., process_group: Optional[Any] = ...,
                          vocab_start_index: Optional[int] = ...) -> Union[Tensor, tuple[Tensor, Tensor]]: ...
@renamed_keywords(**LINEAR_LOGPROBS)
def linear_token_logprobs(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                          linear_bias: Optional[Tensor] = None, temperature: float = 1.0,
                          return_entropy: bool = False, ignore_index: int = -100,
                          softcap: Optional[float] = None,
                          token_weight: Optional[Tensor] = None, chunk_size: Optional[int] = None,
                          grad_accum_dtype: Optional[torch.dtype] = None,
                          process_group: Optional[Any] = None,
                          vocab_start_index: Optional[int] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``token_logprobs(F.linear(input, linear_weight, linear_bias), target, ...)`` without the N x C
    logits.

    Args:
        input: (..., D); linear_weight: (C, D); linear_bias: (C,) or None (same dtype; under
            ``torch.autocast`` cast to the autocast dtype as ``F.linear`` does); target: ids of
            shape ``input.shape[:-1]`` in [0, C) or ``ignore_index``. temperature, return_entropy,
            ignore_index (log-prob 0, entropy 0, no gradient there), softcap (before the
            temperature), token_weight: as in ``token_logprobs``.
        chunk_size: tokens per chunk (default: about 16M logits per chunk).
        grad_accum_dtype: as in ``linear_cross_entropy``: dW / db summed across token chunks in
            fp32 (None, torch.float32; float64 heads in float64) or in ``linear_weight.dtype``
            (less memory, rounding per chunk); any other dtype raises ValueError (on every rank
            under ``process_group`` / DTensor; the class-sharded paths accumulate their shard alike).
        process_group, vocab_start_index: vocabulary parallelism with a class-sharded head
            (``kl/parallel_linear.py``, chunked over tokens as here; softcap / token_weight as
            here, agreed on by every rank). DTensor hidden states and heads (W ``Shard(0)`` over
            the classes: vocabulary parallel, ``kl/dtensor.py``).

    Returns:
        float32 log-probs (target's shape), or (log-probs, entropy); gradients reach input,
        linear_weight and linear_bias (those that require grad: a frozen head allocates no (C, D)
        buffer). FLOPs: forward 2 N D C, backward 6 N D C.

    Example:
        >>> h, W = torch.randn(2, 5, 64, requires_grad=True), torch.randn(1000, 64, requires_grad=True)
        >>> lp = linear_token_logprobs(h, W, torch.randint(0, 1000, (2, 5)), temperature=0.7)
        >>> lp.sum().backward()
    """
    options: dict[str, Any] = dict(
                   temperature=temperature, return_entropy=return_entropy, softcap=softcap,
                   ignore_index=ignore_index, chunk_size=chunk_size,
                   has_token_weight=token_weight is not None,
                   grad_accum_dtype=grad_accum_dtype, weight_dtype=linear_weight.dtype)
    dtensor = is_dtensor(input) or is_dtensor(linear_weight)
    if dtensor or process_group is not None or vocab_start_index is not None:
        opts, error = deferred_kl(**options)  # a rank's error is raised after the exchange, on every rank
        T, cap = (opts.temperature, opts.softcap) if opts is not None else (temperature, 0.0)
        chunk = opts.chunk_size if opts is not None else 0
        ign = opts.ignore_index if opts is not None else -100
        if dtensor:  # the layout comes from the placements (kl/dtensor.py)
            error = error or placement_layout_error(process_group, vocab_start_index, "linear_token_logprobs")
            return dtensor_linear_token_logprobs(input, linear_weight, target, linear_bias, T, return_entropy,
                                                 chunk, error, linear_token_logprobs, cap, token_weight,
                                                 opts is None or opts.accum_fp32, ign)
        tw, error = parallel_token_weight(token_weight, input, error)
        res = vocab_parallel_linear_token_logprobs(input, linear_weight, target, linear_bias, T,
                                                   return_entropy, process_group, vocab_start_index, error,
                                                   agree_token_weight(token_weight), chunk, cap,
                                                   opts is None or opts.accum_fp32, ignore_index=ign)
        return weighted_outputs(res, tw)
    input, linear_weight, linear_bias = check_head(STUDENT, input, linear_weight, linear_bias)
    opts = make_kl(**options)
    tok = class_ids(target, input.shape[:-1], "input's leading shape")
    tw = check_token_weight(token_weight, input.shape[:-1], input.device)
    x = rows(input)
    lp, ent, _stats = linear_logprobs_rows(x, linear_weight, linear_bias, tok, opts)
    shape = input.shape[:-1]
    outs = weighted((lp, ent) if opts.return_entropy else (lp,), tw)
    outs = tuple(o.view(shape) for o in outs)
    return (outs[0], outs[1]) if opts.return_entropy else outs[0]
