"""Vocabulary-parallel (tensor-parallel) cross-entropy over ``torch.distributed``.

Each rank of ``process_group`` holds a contiguous slice [start, start + C_local) of the class
dimension (Megatron's vocab-parallel output layer); targets hold *global* class ids and are the
same on every rank. Every rank returns the same loss (the full-vocabulary loss) and gets the
gradient of its own shard.

Per call (steady state, R = rows = tokens):

1. forward, local: one streaming pass over the shard (``kernels.vocab_parallel``, built on the
   same ``stream_row`` as the single-device forward) -> per-row partials (m, s, A, a_sum, z_y);
2. ``all_reduce(MAX)`` of m: R floats;
3. ``all_reduce(SUM)`` of k partials rescaled to the global reference (s e^{m - ref_g},
   z_y - ref_g or A + a_sum (ref - ref_g), ...): k R floats, k = 2 (hard target), 3 (hard target
   with label smoothing: + A), 3 (soft target: s, A, a_sum);
4. loss, lse and the stats (ref_g, log s_g, row weight) from O(R) torch ops, identical on every
   rank; w_y and sum_j w_j come from the (replicated, global) class weights: no communication;
5. backward, local, no communication: the single-device ``cross_entropy_bwd_kernel`` unchanged,
   fed the global stats, n_classes = C_global, the global weight sum and a *localized* target.

Payload per token per rank: 12 bytes (hard), 16 bytes (smoothing or soft targets) with fp32
partials (float64 logits: twice that); a ring all-reduce moves ~2 (P-1)/P times that per rank.
Never an N x C collective. Every call first runs one ``all_gather`` of a few float64 per rank that
derives the shard layout and checks that the options agree (``core.exchange``; one host sync);
input errors found on one rank are raised after it, on every rank (no rank is left waiting).

Precision: the partial sums are combined relative to the global max (no lse ~ 1e4 is formed and
then subtracted), exactly as the single-device kernel keeps (ref, log s) apart.

Reuse by another shard producer (e.g. the fused linear head): get the ``VocabShard`` from
``vocab_shard``, produce the same partials over the shard ((R, 5), definitions in
``cross_entropy/parallel_kernels.py``; (5, S, R) partials of S class splits go through ``merge_splits``),
then ``combine_partials`` with the ``localize_target`` ids; the returned stats drive any backward
that uses (ref, log s, row weight), with n_classes = ``shard.n_classes`` and the GLOBAL weight sum.

Not checked: that targets and row counts agree across ranks (gloo raises a size mismatch in the
all-reduce; NCCL may hang until its timeout).
``torch.compile``: the call runs eagerly (a graph break around it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import Tensor

from ..core import launch
from ..core.exchange import (
    IGNORED,
    VocabShard,
    agreement,
    exchange_device,
    flags,
    localize_target,
    refuse_agreed,
    vocab_shard,
)
from ..core.inputs import Canonical, canonical, check_token_weight, check_weight, target_range_check
from ..core.op_schema import input_grads
from ..core.options import LossOptions
from ..core.partials import N_PARTIALS, chunked_partials, combine
from ..core.reduction import reduce_rows
from ..core.runtime import (
    alloc,
    compute_dtype,
    is_compiling,
    no_second_derivative,
    upstream_or_zeros,
    uses_triton,
)
from ..cross_entropy.ops import backward_into, nd_c_strides
from .parallel_kernels import vocab_parallel_fwd_kernel


def empty_partials(rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(1, rows, 5) partials of a shard with no class (m = -inf, every sum 0): what a rank left
    empty by ``torch.chunk`` contributes (DTensor shards, C = 5 over 4 ranks)."""
    part = torch.zeros((1, rows, N_PARTIALS), dtype=dtype, device=device)
    part[..., 0] = float("-inf")
    return part


def shard_partials(x3: Tensor, tgt: Tensor, w: Optional[Tensor], n_classes: int,
                   opts: LossOptions) -> Tensor:
    """(1, R, 5) partials (m, s, A, a_sum, z_y) of the shard's (N, C_local, D) logits ``x3``.

    ``tgt``: localized int64 (R,) ids, or the shard of a soft target ((N, C_local, D) view);
    ``w``: the shard's slice of the class weights; ``n_classes``: the global C.
    fp32 (float64 for float64 logits).
    """
    if x3.shape[1] == 0:  # an empty shard: no kernel over zero classes
        return empty_partials(x3.shape[0] * x3.shape[2], compute_dtype(x3), x3.device)
    if not uses_triton(x3):
        return chunked_partials(x3, tgt, w, n_classes, opts)
    N, C, D = x3.shape
    R = N * D
    part = alloc((1, R, N_PARTIALS), torch.float32, x3.device)
    if R == 0:
        return part
    soft = tgt.is_floating_point()
    soft_t = tgt if soft else x3  # placeholder pointers are never dereferenced
    cfg = launch.config(C)
    xs, ts = nd_c_strides(x3), nd_c_strides(soft_t)
    vocab_parallel_fwd_kernel[(R,)](
        x_ptr=x3, stride_xn=xs["n"], stride_xd=xs["d"], stride_xc=xs["c"],
        tgt_ptr=x3 if soft else tgt, w_ptr=w if w is not None else x3,
        soft_ptr=soft_t, stride_tn=ts["n"], stride_td=ts["d"], stride_tc=ts["c"], part_ptr=part,
        C=C, D=D, n_classes=n_classes, label_smoothing=opts.label_smoothing, softcap=opts.softcap,
        logit_scale=opts.logit_scale, HAS_WEIGHT=w is not None, HAS_SMOOTHING=opts.has_smoothing,
        SOFT_TARGET=soft, HAS_SOFTCAP=opts.has_softcap, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )
    return part


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Eager autograd: forward = shard partials + 2 collectives + O(R) math; backward = local."""

    @staticmethod
    def forward(ctx, x3, target, weight, shard: VocabShard, group, opts: LossOptions, inplace_backward):
        soft = target.is_floating_point()
        tgt = target if soft else localize_target(target, shard, opts.ignore_index)
        # a fresh (16-byte aligned) copy of the shard's weights: C_local floats
        w_local = weight[shard.start:shard.start + shard.size].clone() if weight is not None else None
        part = shard_partials(x3, tgt, w_local, shard.n_classes, opts)
        loss, lse, stats = combine(part, target, weight, shard.n_classes, opts, group=group)
        wsum = weight.sum(dtype=part.dtype).reshape(1) if weight is not None else None
        ctx.save_for_backward(x3, tgt, w_local, wsum, stats)
        ctx.opts, ctx.n_classes, ctx.inplace_backward = opts, shard.n_classes, inplace_backward
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        dt = compute_dtype(x3)
        return loss.to(dt), lse.to(dt), stats

    @staticmethod
    def backward(ctx, dloss, dlse, _dstats):
        x3, tgt, w_local, wsum, stats = ctx.saved_tensors
        dloss = upstream_or_zeros(dloss, stats.shape[0], stats.dtype, x3.device)
        # a probability target that requires grad (a trainable teacher): dL/dt_j of this shard's
        # classes, from the same pass with the GLOBAL lse (the single device's formula)
        soft_grad = tgt.is_floating_point() and ctx.needs_input_grad[1]
        dtarget = alloc(tgt.shape, tgt.dtype, tgt.device) if soft_grad else None
        inplace = ctx.inplace_backward and not soft_grad  # dL/dt reads the logits x3
        out = x3 if inplace else alloc(x3.shape, x3.dtype, x3.device)
        if x3.shape[1] != 0:  # an empty shard has an empty gradient
            shard_opts = dataclasses.replace(ctx.opts, ignore_index=IGNORED)  # the localized target's
            with torch.no_grad():  # create_graph=True: values only, tied below to a raising node
                backward_into(out, x3, tgt, w_local, stats, dloss, dlse, shard_opts, ctx.n_classes, wsum,
                              dtarget)
        if inplace:
            torch.autograd.graph.increment_version(x3)
        return input_grads(ctx, no_second_derivative(out, "cross_entropy", anchor=x3),
                           no_second_derivative(dtarget, "cross_entropy", anchor=tgt))


def vocab_parallel_cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor],
                                 opts: LossOptions, *, inplace_backward: bool, return_lse: bool,
                                 process_group: Any, vocab_start_index: Optional[int] = None,
                                 options_error: Optional[BaseException] = None,
                                 unsupported: Optional[dict] = None, token_weight: Optional[Tensor] = None):
    """``cross_entropy`` over a vocabulary shard (called by it when ``process_group`` is given).

    ``input``: this rank's (N, C_local, ...) slice of the logits; ``target``: GLOBAL ids (or this
    rank's slice of class probabilities); ``weight``: the GLOBAL class weights; ``token_weight``:
    per-token weights of the target's shape, the same on every rank. Returns the loss
    (and the lse) of the full vocabulary, identical on every rank, in the compute dtype (float64
    for float64 logits). Runs eagerly even inside ``torch.compile`` (a graph break around it).

    Example:
        >>> loss = vocab_parallel_cross_entropy(logits_shard, y, None, LossOptions(),
        ...                                     inplace_backward=False, return_lse=False, process_group=tp)
    """
    tw = None
    if token_weight is not None:
        try:  # a bad token weight on one rank is raised after the exchange, on every rank
            tw = check_token_weight(token_weight, canonical_shard(input, target))
        except (TypeError, ValueError, IndexError) as e:
            options_error = options_error or e
    can, loss_rows, lse, stats = vocab_parallel_rows(
        input, target, weight, opts, inplace_backward=inplace_backward, return_lse=return_lse,
        process_group=process_group, vocab_start_index=vocab_start_index, options_error=options_error,
        unsupported=unsupported, token_weight=token_weight)
    loss = reduce_rows(loss_rows, lse, stats, can.target, opts, can.rows_to_output, tw)
    return (loss, can.rows_to_output(lse)) if return_lse else loss


def vocab_parallel_rows(input: Tensor, target: Tensor, weight: Optional[Tensor], opts: LossOptions, *,
                        inplace_backward: bool, return_lse: bool, process_group: Any,
                        vocab_start_index: Optional[int] = None, allow_empty: bool = False,
                        options_error: Optional[BaseException] = None, unsupported: Optional[dict] = None,
                        token_weight: Optional[Tensor] = None):
    """(Canonical, loss_rows (R,), lse (R,), stats (R, 3)) of the full vocabulary before the
    reduction (the DTensor path reduces them itself). ``allow_empty``: a rank may hold 0 classes.
    ``options_error``: this rank's options failed validation; raised after the exchange.
    ``unsupported``: name -> value of options this path refuses (``return_stats``, ...): part of
    the agreement, then refused on every rank alike (``layout.refuse_agreed``). ``token_weight``:
    only whether it is given enters the agreement (the caller applies it to the rows)."""
    args = (input, target, weight, opts, inplace_backward, return_lse, process_group, vocab_start_index,
            allow_empty, options_error, unsupported, token_weight is not None)
    if is_compiling():
        return torch.compiler.disable(_rows)(*args)
    return _rows(*args)


def canonical_shard(input: Tensor, target: Tensor) -> Canonical:
    """``canonical`` that also takes a shard with no class (validated through a one-class stand-in)."""
    if not isinstance(input, Tensor) or input.dim() == 0:
        raise ValueError("input must be a tensor of shape (C), (N, C) or (N, C, d1, ..., dK)")
    cdim = 0 if input.dim() == 1 else 1
    if input.shape[cdim] != 0:
        return canonical(input, target)
    shape = list(input.shape)
    shape[cdim] = 1
    stand = input.new_zeros(shape)  # N x 1 x D elements, never read by a kernel
    soft = isinstance(target, Tensor) and target.is_floating_point()
    if soft and target.shape != input.shape:
        raise ValueError(f"class-probability target must have the input's shape {tuple(input.shape)}, "
                         f"got {tuple(target.shape)}")
    can = canonical(stand, target.new_zeros(shape) if soft else target)
    x3 = input.reshape(can.x3.shape[0], 0, can.x3.shape[2])
    return Canonical(x3, target.reshape(x3.shape) if soft else can.target, can.out_shape, 0, can.perm)


def _rows(input, target, weight, opts: LossOptions, inplace_backward, return_lse, process_group,
          vocab_start_index, allow_empty, options_error, unsupported, has_token_weight):
    can, local_error = None, options_error
    try:
        can = canonical_shard(input, target)
    except (TypeError, ValueError, IndexError) as e:  # raised after the exchange: no rank hangs
        local_error = local_error or e
    agree = agreement(weight, opts, return_lse=float(return_lse),
                      soft_target=float(isinstance(target, Tensor) and target.is_floating_point()),
                      token_weight=float(has_token_weight))
    agree.update(flags(unsupported))  # DTensor refuses token_weight: its flag comes from there
    what = "vocab-parallel cross_entropy"
    shard = vocab_shard(process_group, can.C if can is not None else 0, exchange_device(process_group, input),
                        vocab_start_index, agree, what, allow_empty, local_error)
    refuse_agreed(what, unsupported)
    w = check_weight(weight, shard.n_classes, input.device, input.dtype)
    if not can.soft:
        target_range_check(can.target, shard.n_classes, opts.ignore_index)
    if inplace_backward and input.is_leaf:
        inplace_backward = False
    loss_rows, lse, stats = VocabParallelCrossEntropyFunction.apply(
        can.x3, can.target, w, shard, process_group, opts, bool(inplace_backward))
    return can, loss_rows, lse, stats
