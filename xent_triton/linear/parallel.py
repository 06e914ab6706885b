"""Vocabulary-parallel (tensor-parallel) fused linear cross-entropy over ``torch.distributed``.

Megatron's column-parallel output layer without the logits: rank r of ``process_group`` holds the
classifier rows ``W[start:start + C_local]`` (and bias slice) of a contiguous slice of the
vocabulary; the hidden states ``X`` (N, D) and the GLOBAL target ids are the same on every rank.
Every rank returns the same full-vocabulary loss (and lse); each rank gets the gradient of its own
weight / bias shard; the input gradient is summed over the group in backward (every rank then
holds the full dL/dX), or left as this rank's partial with ``reduce_input_grad=False``.

Nothing here is a new kernel or a new formula; this module only wires two finished pieces:

1. forward, local: ``linear.ops.forward_partials`` with ``class_offset = shard.start`` -> per-row
   partials (m, s, A, a_sum, z_y) of this shard's classes, per class split (S, N, 5);
2. ``partials.combine(..., group=group)`` (the one combine): ``all_reduce(MAX)`` of m
   (N floats) and one ``all_reduce(SUM)`` of k rescaled partials (k N floats; k = 2, or 3 with
   label smoothing) -> the global loss, lse and the backward stats (ref_g, log s_g, row weight),
   identical on every rank;
3. backward, local: ``linear.ops.backward_accumulate`` with the global stats, ``class_offset``,
   ``n_classes = C_global`` and the GLOBAL class-weight sum (label smoothing) -> fp32 dW, db of the
   shard and this shard's partial dX = dz_shard W_shard;
4. ``all_reduce(SUM)`` of the fp32 dX accumulator (N D floats) when ``reduce_input_grad``: the
   one communication the input gradient needs (X feeds every shard's logits), the same all-reduce
   Megatron's ``copy_to_tensor_model_parallel_region`` does in backward. It is reduced in fp32
   (like the single-device fp32 accumulation across class tiles) and cast to X's dtype once.

Per call, per rank, N tokens: forward 4 N (MAX) + 4 k N (SUM) bytes = 12 (16 with smoothing)
bytes per token; backward 4 D bytes per token (fp32 dX; float64 inputs: twice everything) or 0
with ``reduce_input_grad=False``. Never an N x C collective. Every call first runs the layout /
agreement ``all_gather`` of 20 float64 per rank (``core.exchange.vocab_shard``, no cache): the
options, the hidden size, the bias and whether the input needs a gradient (the backward dX
all-reduce depends on it) must agree, and operand errors of one rank are raised on every rank.

Not checked: the same targets and N on every rank (gloo raises a size mismatch in the
all-reduce; NCCL may hang until its timeout).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.exchange import VocabShard, agreement, exchange_device, flags, refuse_agreed, vocab_shard
from ..core.inputs import (
    Canonical,
    autocast_operands,
    check_linear_operands,
    check_token_weight,
    check_weight,
    class_ids,
    target_range_check,
)
from ..core.op_schema import input_grads
from ..core.options import LossOptions, check_chunking
from ..core.partials import combine
from ..core.reduction import reduce_rows
from ..core.runtime import compute_dtype, is_compiling, no_second_derivative, upstream_or_zeros
from ..cross_entropy.parallel import empty_partials
from ..linear.ops import backward_accumulate, forward_partials


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """Eager autograd: forward = shard partials + 2 collectives of O(N); backward = the linear
    head's backward with the global stats + (optionally) one all_reduce of dX (N x D)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                weight: Optional[Tensor], shard: VocabShard, group: Any, opts: LossOptions,
                skip_ignored: bool, reduce_input_grad: bool, chunk_size: int):
        # this shard's class weights as a fresh (aligned, contiguous) copy: C_local floats
        w_local = weight[shard.start:shard.start + shard.size].clone() if weight is not None else None
        if shard.size == 0:  # an empty shard (DTensor's torch.chunk layout): no kernel
            part = empty_partials(x.shape[0], compute_dtype(x), x.device)
        else:
            part = forward_partials(x, w, b, target, w_local, opts, skip_ignored, class_offset=shard.start)
        loss, lse, stats = combine(part, target, weight, shard.n_classes, opts, group=group)
        # the GLOBAL sum of class weights (label smoothing), never the shard's
        wsum = weight.sum(dtype=part.dtype).reshape(1) if weight is not None else None
        ctx.save_for_backward(x, w, b, target, w_local, wsum, stats)
        ctx.opts, ctx.shard, ctx.group, ctx.reduce_input_grad = opts, shard, group, reduce_input_grad
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        cdt = compute_dtype(x)
        return loss.to(cdt), lse.to(cdt), stats

    @staticmethod
    def backward(ctx, dloss, dlse, _dstats):
        x, w, b, target, w_local, wsum, stats = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
        dloss = upstream_or_zeros(dloss, stats.shape[0], stats.dtype, x.device)
        shard = ctx.shard
        with torch.no_grad():  # create_graph=True: values only, tied below to a raising node
            if shard.size == 0:  # no class here: zero partial input gradient, empty weight gradients
                cdt = compute_dtype(x)
                dx = torch.zeros(x.shape, dtype=cdt, device=x.device) if need[0] else None
                dw = torch.zeros(w.shape, dtype=cdt, device=x.device) if need[1] else None
                db = torch.zeros(b.shape, dtype=cdt, device=x.device) if need[2] else None
            else:
                dx, dw, db = backward_accumulate(x, w, b, target, w_local, stats, dloss, dlse, ctx.opts, need,
                                                 class_offset=shard.start, n_classes=shard.n_classes,
                                                 weight_total=wsum, chunk_size=ctx.chunk_size)
            if dx is not None and ctx.reduce_input_grad:
                dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=ctx.group)  # fp32, then one cast
            grads = (dx.to(x.dtype) if dx is not None else None, dw.to(w.dtype) if dw is not None else None,
                     db.to(b.dtype) if db is not None else None)
        # each gradient hangs off its own operand (saved input, in the graph under create_graph):
        # differentiating it again reaches the raising node, never a silent zero
        return input_grads(ctx, *(no_second_derivative(g, "linear_cross_entropy", anchor=t)
                                  for g, t in zip(grads, (x, w, b))))


def vocab_parallel_linear_cross_entropy(
        input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor],
        weight: Optional[Tensor], opts: LossOptions, *, return_lse: bool, process_group: Any,
        vocab_start_index: Optional[int] = None, reduce_input_grad: bool = True,
        options_error: Optional[BaseException] = None, unsupported: Optional[dict] = None,
        token_weight: Optional[Tensor] = None, chunk_size: Optional[int] = None,
        grad_accum_dtype: Any = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``linear_cross_entropy`` with the classifier split over the vocabulary across ``process_group``
    (called by it). ``linear_weight`` (C_local, D) holds this rank's rows, ``target`` GLOBAL ids
    and ``weight`` the GLOBAL class weights, both the same on every rank; every rank returns the
    full-vocabulary loss (compute dtype); ``token_weight`` (the target's shape, the same on every
    rank) weights each token's loss as on one device; ``chunk_size`` sizes the backward's
    vocabulary splits; ``grad_accum_dtype`` is validated and agreed on (the backward forms dW by
    one GEMM over all tokens per split: nothing accumulates across token chunks). Errors
    (bad operands on one rank, bad layout, an empty shard, options that differ across
    ranks) are raised on every rank alike, after the exchange.

    Example:
        >>> loss = vocab_parallel_linear_cross_entropy(h, W_shard, y, None, None, LossOptions(),
        ...                                            return_lse=False, process_group=tp)
    """
    tw = None
    if token_weight is not None:
        try:  # a bad token weight on one rank is raised after the exchange, on every rank
            if not (isinstance(input, Tensor) and isinstance(target, Tensor)):
                raise TypeError("input and target must be tensors")
            tw = check_token_weight(token_weight, Canonical(input, target, tuple(target.shape), 0, None))
        except (TypeError, ValueError) as e:
            options_error = options_error or e
    tgt, loss_rows, lse, stats = vocab_parallel_linear_rows(
        input, linear_weight, target, linear_bias, weight, opts, return_lse=return_lse,
        process_group=process_group, vocab_start_index=vocab_start_index,
        reduce_input_grad=reduce_input_grad, options_error=options_error, unsupported=unsupported,
        token_weight=token_weight, chunk_size=chunk_size, grad_accum_dtype=grad_accum_dtype)
    loss = reduce_rows(loss_rows, lse, stats, tgt, opts, lambda r: r.view(target.shape), tw)
    return (loss, lse.view(target.shape)) if return_lse else loss


def vocab_parallel_linear_rows(input: Tensor, linear_weight: Tensor, target: Tensor,
                               linear_bias: Optional[Tensor], weight: Optional[Tensor], opts: LossOptions, *,
                               return_lse: bool, process_group: Any, vocab_start_index: Optional[int] = None,
                               reduce_input_grad: bool = True, allow_empty: bool = False,
                               options_error: Optional[BaseException] = None,
                               unsupported: Optional[dict] = None, token_weight: Optional[Tensor] = None,
                               chunk_size: Optional[int] = None, grad_accum_dtype: Any = None):
    """(flat target (N,), loss_rows, lse, stats) of the full vocabulary before the reduction
    (the DTensor path reduces them itself). ``allow_empty``: a rank may hold 0 classes.
    ``unsupported``: options this path refuses, agreed on first, then refused on every rank;
    ``token_weight``: only whether it is given enters the agreement (the caller applies it);
    ``chunk_size`` / ``grad_accum_dtype``: validated before the exchange, then agreed on."""
    args = (input, linear_weight, target, linear_bias, weight, opts, return_lse, process_group,
            vocab_start_index, reduce_input_grad, allow_empty, options_error, unsupported,
            token_weight is not None, chunk_size, grad_accum_dtype)
    if is_compiling():  # collectives inside an eager autograd.Function: a graph break
        return torch.compiler.disable(_rows)(*args)
    return _rows(*args)


def check_shard_operands(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor],
                         target: Tensor) -> None:
    """``check_linear_operands`` that also takes a shard with no class (a one-row stand-in)."""
    if isinstance(linear_weight, Tensor) and linear_weight.dim() == 2 and linear_weight.shape[0] == 0:
        linear_weight = linear_weight.new_zeros(1, linear_weight.shape[1])
        if isinstance(linear_bias, Tensor) and linear_bias.shape == (0,):
            linear_bias = linear_bias.new_zeros(1)
    check_linear_operands(input, linear_weight, linear_bias, target)


def _rows(input, linear_weight, target, linear_bias, weight, opts: LossOptions, return_lse, process_group,
          vocab_start_index, reduce_input_grad, allow_empty, options_error, unsupported, has_token_weight,
          chunk_size, grad_accum_dtype):
    local_error = options_error
    chunk, accum_fp32 = 0, True
    try:
        if isinstance(input, Tensor) and isinstance(linear_weight, Tensor):
            input, linear_weight, linear_bias = autocast_operands(input, linear_weight, linear_bias)
        check_shard_operands(input, linear_weight, linear_bias, target)
        tgt = class_ids(target, input.shape[:-1], "input's leading shape")
        chunk, accum_fp32 = check_chunking(chunk_size, grad_accum_dtype, linear_weight.dtype)
    except (TypeError, ValueError, IndexError) as e:  # raised after the exchange: no rank hangs
        local_error = local_error or e
    ok = local_error is None
    C_local, D = linear_weight.shape if ok else (0, 0)
    needs_dx = ok and input.requires_grad and torch.is_grad_enabled()
    agree = agreement(weight, opts, hidden_size=D, bias=float(linear_bias is not None),
                      input_requires_grad=float(needs_dx), reduce_input_grad=float(reduce_input_grad),
                      return_lse=float(return_lse), token_weight=float(has_token_weight),
                      chunk_size=chunk, grad_accum_fp32=float(accum_fp32))
    agree.update(flags(unsupported))  # DTensor refuses token_weight: its flag comes from there
    what = "vocab-parallel linear_cross_entropy"
    shard = vocab_shard(process_group, C_local, exchange_device(process_group, input), vocab_start_index,
                        agree, what, allow_empty, local_error)
    refuse_agreed(what, unsupported)
    w = check_weight(weight, shard.n_classes, input.device, input.dtype)
    target_range_check(tgt, shard.n_classes, opts.ignore_index)
    x2 = input.reshape(-1, D)
    bias = linear_bias.contiguous() if linear_bias is not None else None
    skip = not return_lse and opts.lse_square_scale == 0
    loss_rows, lse, stats = VocabParallelLinearCrossEntropyFunction.apply(
        x2, linear_weight, bias, tgt, w, shard, process_group, opts, skip, bool(reduce_input_grad), chunk)
    return tgt, loss_rows, lse, stats
