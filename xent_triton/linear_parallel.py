"""Vocabulary-parallel (tensor-parallel) fused linear cross-entropy over ``torch.distributed``.

Megatron's column-parallel output layer without the logits: rank r of ``process_group`` holds the
classifier rows ``W[start:start + C_local]`` (and bias slice) of a contiguous slice of the
vocabulary; the hidden states ``X`` (N, D) and the GLOBAL target ids are the same on every rank.
Every rank returns the same full-vocabulary loss (and lse); each rank gets the gradient of its own
weight / bias shard; the input gradient is summed over the group in backward (every rank then
holds the full dL/dX), or left as this rank's partial with ``reduce_input_grad=False``.

Nothing here is a new kernel or a new formula; this module only wires two finished pieces:

1. forward, local: ``linear_ops.forward_partials`` with ``class_offset = shard.start`` -> per-row
   partials (m, s, A, a_sum, z_y) of this shard's classes, per class split (5, S, N);
   ``distributed.merge_splits`` -> the (N, 5) partials of the shard;
2. ``distributed.combine_partials`` (the core's vocab-parallel combine): ``all_reduce(MAX)`` of m
   (N floats) and one ``all_reduce(SUM)`` of k rescaled partials (k N floats; k = 2, or 3 with
   label smoothing) -> the global loss, lse and the backward stats (ref_g, log s_g, row weight),
   identical on every rank;
3. backward, local: ``linear_ops.backward_accumulate`` with the global stats, ``class_offset``,
   ``n_classes = C_global`` and the GLOBAL class-weight sum (label smoothing) -> fp32 dW, db of the
   shard and this shard's partial dX = dz_shard W_shard;
4. ``all_reduce(SUM)`` of the fp32 dX accumulator (N D floats) when ``reduce_input_grad``: the
   one communication the input gradient needs (X feeds every shard's logits), the same all-reduce
   Megatron's ``copy_to_tensor_model_parallel_region`` does in backward. It is reduced in fp32
   (like the single-device fp32 accumulation across class tiles) and cast to X's dtype once.

Per call, per rank, N tokens: forward 4 N (MAX) + 4 k N (SUM) bytes = 12 (16 with smoothing)
bytes per token; backward 4 D bytes per token (fp32 dX; float64 inputs: twice everything) or 0
with ``reduce_input_grad=False``. Never an N x C collective. The first call per layout adds the
shard-layout ``all_gather`` of 3 int64 per rank (``distributed.vocab_shard``, cached).

Requirements not checked (each would cost a collective per call): the same targets, N, options
and requires_grad flags on every rank (a rank whose input does not require grad skips the dX
all-reduce that the others enter).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import linear_ops, ops
from .distributed import VocabShard, combine_partials, localize_target, merge_splits, vocab_shard
from .functional import check_options, check_target_range, check_weight, reduce_rows


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """Eager autograd: forward = shard partials + 2 collectives of O(N); backward = the linear
    head's backward with the global stats + (optionally) one all_reduce of dX (N x D)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                weight: Optional[Tensor], shard: VocabShard, group: Any, ignore_index: int,
                eps: float, zl: float, softcap: float, logit_scale: float, skip_ignored: bool,
                reduce_input_grad: bool):
        # this shard's class weights as a fresh (aligned, contiguous) copy: C_local floats
        w_local = weight[shard.start:shard.start + shard.size].clone() if weight is not None else None
        part = linear_ops.forward_partials(x, w, b, target, w_local, ignore_index, eps, softcap,
                                           logit_scale, skip_ignored, class_offset=shard.start)
        local_t = localize_target(target, shard, ignore_index)
        loss, lse, stats = combine_partials(merge_splits(part), target, local_t, weight, shard,
                                            group, ignore_index, eps, zl)
        # the GLOBAL sum of class weights (label smoothing), never the shard's
        wsum = weight.sum(dtype=part.dtype).reshape(1) if weight is not None else None
        ctx.save_for_backward(x, w, b, target, w_local, wsum, stats)
        ctx.hparams = (ignore_index, eps, zl, softcap, logit_scale)
        ctx.shard, ctx.group, ctx.reduce_input_grad = shard, group, reduce_input_grad
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        cdt = linear_ops._cdt(x)
        return loss.to(cdt), lse.to(cdt), stats

    @staticmethod
    def backward(ctx, dloss, dlse, _dstats):
        x, w, b, target, w_local, wsum, stats = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = b is not None and ctx.needs_input_grad[2]
        if dloss is None:  # only the lse entered the objective
            dloss = torch.zeros((), dtype=stats.dtype, device=x.device).expand(stats.shape[0])
        shard = ctx.shard
        dx, dw, db = linear_ops.backward_accumulate(
            x, w, b, target, w_local, stats, dloss, dlse, *ctx.hparams, need_dx, need_dw, need_db,
            class_offset=shard.start, n_classes=shard.n_classes, weight_total=wsum)
        if dx is not None and ctx.reduce_input_grad:
            dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=ctx.group)  # fp32, then one cast
        return (dx.to(x.dtype) if dx is not None else None,
                dw.to(w.dtype) if dw is not None else None,
                db.to(b.dtype) if db is not None else None) + (None,) * 11


def vocab_parallel_linear_cross_entropy(
        input: Tensor, linear_weight: Tensor, target: Tensor, *,
        linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
        ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
        lse_square_scale: float = 0.0, softcap: Optional[float] = None, logit_scale: float = 1.0,
        return_lse: bool = False, process_group: Any, vocab_start_index: Optional[int] = None,
        reduce_input_grad: bool = True) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``linear_cross_entropy`` with the classifier split over the vocabulary across ``process_group``.

    Args:
        input: hidden states (..., D), the same on every rank of the group.
        linear_weight: (C_local, D) this rank's rows of the classifier (a contiguous class range).
        target: GLOBAL class ids of shape ``input.shape[:-1]``, the same on every rank.
        linear_bias: optional (C_local,) slice of the bias.
        weight: optional GLOBAL (C_global,) class weights, the same on every rank.
        ignore_index, reduction, label_smoothing (spread over C_global classes), lse_square_scale,
            softcap, logit_scale, return_lse: as in ``linear_cross_entropy`` (full-vocabulary
            semantics; lse is the global log-sum-exp).
        process_group: the tensor-parallel group (required).
        vocab_start_index: this rank's first class id; None on every rank = shards contiguous in
            group-rank order (Megatron's layout; unequal sizes allowed).
        reduce_input_grad: True: the input gradient is all-reduced (summed) over the group in
            backward, so every rank holds the full dL/dinput. False: each rank gets its shard's
            partial (for callers whose own autograd region reduces it, e.g. a sequence-parallel
            reduce-scatter); the sum over the group is the full gradient.

    Returns:
        The loss (float32; float64 for float64 input), bitwise the same on every rank, and with
        ``return_lse`` the global lse. Gradients: input (see ``reduce_input_grad``), this rank's
        linear_weight / linear_bias shard.

    Raises the same error on every rank for a bad layout (shards that do not tile [0, C_global),
    an empty shard, ``vocab_start_index`` on some ranks only, class weights not of length
    C_global) and, on CPU, for target ids outside [0, C_global) (IndexError).
    """
    if process_group is None:
        raise ValueError("vocab_parallel_linear_cross_entropy needs a process_group "
                         "(use linear_cross_entropy for a single device)")
    if ops._is_compiling():  # collectives inside an eager autograd.Function: a graph break
        return torch.compiler.disable(_eager)(
            input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
            label_smoothing, lse_square_scale, softcap, logit_scale, return_lse, process_group,
            vocab_start_index, reduce_input_grad)
    return _eager(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                  label_smoothing, lse_square_scale, softcap, logit_scale, return_lse,
                  process_group, vocab_start_index, reduce_input_grad)


def _eager(input, linear_weight, target, linear_bias, weight, ignore_index, reduction,
           label_smoothing, lse_square_scale, softcap, logit_scale, return_lse, process_group,
           vocab_start_index, reduce_input_grad):
    from .linear import _check_linear  # lazy: linear.py imports this module

    check_options(reduction, label_smoothing, lse_square_scale, softcap, logit_scale)
    _check_linear(input, linear_weight, linear_bias, target)
    C_local, D = linear_weight.shape
    wlen = -1 if weight is None else (weight.numel() if isinstance(weight, Tensor) else -2)
    shard = vocab_shard(process_group, C_local, input.device, vocab_start_index, wlen)
    w = check_weight(weight, shard.n_classes, input.device)
    tgt = target.reshape(-1).to(torch.int64).contiguous()  # the kernels read it with unit stride
    check_target_range(tgt, shard.n_classes, int(ignore_index))
    x2 = input.reshape(-1, D)
    bias = linear_bias.contiguous() if linear_bias is not None else None
    loss_rows, lse, stats = VocabParallelLinearCrossEntropyFunction.apply(
        x2, linear_weight, bias, tgt, w, shard, process_group, int(ignore_index),
        float(label_smoothing), float(lse_square_scale),
        float(softcap) if softcap is not None else 0.0, float(logit_scale), not return_lse,
        bool(reduce_input_grad))
    loss = reduce_rows(loss_rows, stats, reduction, False, target.shape)
    return (loss, lse.view(target.shape)) if return_lse else loss
