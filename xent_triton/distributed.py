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
Never an N x C collective. The first call per (group, C_local, vocab_start_index, weight length)
adds one ``all_gather`` of 3 int64 per rank that derives and validates the shard layout (cached).

Precision: the partial sums are combined relative to the global max (no lse ~ 1e4 is formed and
then subtracted), exactly as the single-device kernel keeps (ref, log s) apart.

Reuse by another shard producer (e.g. the fused linear head): get the ``VocabShard`` from
``vocab_shard``, produce the same partials over the shard ((R, 5), definitions in
``kernels/vocab_parallel.py``; (5, S, R) partials of S class splits go through ``merge_splits``),
then ``combine_partials`` with the ``localize_target`` ids; the returned stats drive any backward
that uses (ref, log s, row weight), with n_classes = ``shard.n_classes`` and the GLOBAL weight sum.

Not checked (a collective per call would be needed): that targets and row counts agree across
ranks, and that a setup validated on its first call does not later change on some ranks only.
``torch.compile``: the call runs eagerly (a graph break around it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops, reference
from .functional import reduce_rows
from .launch import backward_compile_options, backward_grid, config, interpreting, vector_friendly

M, S, A, ASUM, ZY = range(5)
N_PARTIALS = 5
IGNORED = -1  # localized target of an ignored row (what the kernels get as ignore_index)
FOREIGN = -2  # localized target of a row whose class lives in another shard (or out of range)


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """This rank's contiguous class range [start, start + size) of an ``n_classes`` vocabulary."""
    start: int
    size: int
    n_classes: int
    rank: int
    world_size: int


_LAYOUTS: dict[tuple, VocabShard] = {}
_NOT_GIVEN = -(2 ** 62)  # vocab_start_index=None in the layout all_gather


def _layout_from_table(rows: list[list[int]], rank: int) -> VocabShard:
    """Shard of ``rank`` from every rank's (C_local, start or _NOT_GIVEN, weight length or -1);
    raises the same ValueError on every rank (all see the same table)."""
    sizes, starts, wlens = ([r[i] for r in rows] for i in range(3))
    if min(sizes) < 1:
        raise ValueError(f"vocab-parallel cross_entropy: every rank must hold at least one class; "
                         f"local class counts by group rank: {sizes}")
    if all(s == _NOT_GIVEN for s in starts):
        starts = [sum(sizes[:i]) for i in range(len(sizes))]  # contiguous in group-rank order
    elif any(s == _NOT_GIVEN for s in starts):
        raise ValueError("vocab-parallel cross_entropy: vocab_start_index must be given on every rank "
                         f"of the group or on none; got {[None if s == _NOT_GIVEN else s for s in starts]}")
    n = sum(sizes)
    ranges = sorted(zip(starts, sizes))
    ends = [a + b for a, b in ranges]
    if ranges[0][0] != 0 or any(ends[i] != ranges[i + 1][0] for i in range(len(ranges) - 1)):
        raise ValueError(f"vocab-parallel cross_entropy: the shards do not tile [0, {n}) exactly: "
                         f"(start, size) by group rank = {list(zip(starts, sizes))}")
    if len(set(wlens)) != 1 or wlens[0] not in (-1, n):
        raise ValueError(f"vocab-parallel cross_entropy: weight must be given on every rank or none, "
                         f"with the global number of classes ({n}) entries; weight lengths by group "
                         f"rank: {wlens} (-1 = none)")
    return VocabShard(starts[rank], sizes[rank], n, rank, len(sizes))


def vocab_shard(group: Any, local_size: int, device: torch.device,
                vocab_start_index: Optional[int] = None, weight_len: int = -1) -> VocabShard:
    """This rank's shard of the vocabulary of ``group``; derived and validated by one all_gather
    on the first call per (group, local_size, vocab_start_index, weight_len), then cached.

    Layout: ``vocab_start_index=None`` on every rank = shards in group-rank order (rank i starts
    at the sum of the local sizes of ranks < i; Megatron's layout, unequal sizes allowed); else the
    given starts, which must tile [0, C_global) with no gap or overlap. Errors are raised on
    every rank alike.
    """
    key = (group, int(local_size), vocab_start_index, int(weight_len), torch.device(device).type)
    shard = _LAYOUTS.get(key)
    if shard is None:
        start = _NOT_GIVEN if vocab_start_index is None else int(vocab_start_index)
        mine = torch.tensor([int(local_size), start, int(weight_len)], dtype=torch.int64, device=device)
        table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(table, mine, group=group)
        shard = _layout_from_table(torch.stack(table).cpu().tolist(), dist.get_rank(group))
        _LAYOUTS[key] = shard
    return shard


def localize_target(target: Tensor, shard: VocabShard, ignore_index: int) -> Tensor:
    """Global class ids (int64) -> shard-local ids: id - start inside the shard, ``IGNORED`` for
    ignore_index, ``FOREIGN`` otherwise (another shard's class, or out of range). A shard-local id
    may equal the user's ignore_index without harm: the kernels only ever see ``IGNORED``."""
    local = target - shard.start
    owned = (local >= 0) & (local < shard.size)
    out = torch.where(owned, local, torch.full_like(local, FOREIGN))
    return torch.where(target == ignore_index, torch.full_like(local, IGNORED), out)


# ----------------------------------------------------------------------------- forward partials
def _partials_torch(x3: Tensor, tgt: Tensor, w: Optional[Tensor], n_classes: int, eps: float,
                    softcap: float, logit_scale: float) -> Tensor:
    """The kernel's partials with chunked torch ops (CPU without the interpreter, float64)."""
    N, C, D = x3.shape
    R, cdt, dev = N * D, reference._compute_dtype(x3), x3.device
    soft = tgt if tgt.is_floating_point() else None
    m = torch.full((R,), float("-inf"), dtype=cdt, device=dev)
    s, acc, a_sum = (torch.zeros(R, dtype=cdt, device=dev) for _ in range(3))
    for c0 in range(0, C, reference.CHUNK_C):
        c1 = min(C, c0 + reference.CHUNK_C)
        z = reference._transform(reference._rows(x3, c0, c1, cdt), logit_scale, softcap)
        m_new = torch.maximum(m, z.amax(1))
        ref_old, ref_new = reference._safe_ref(m), reference._safe_ref(m_new)
        s = s * torch.exp(ref_old - ref_new) + torch.exp(z - ref_new[:, None]).sum(1)
        if soft is not None or eps > 0:
            a = reference._smooth_coef(soft, w, c0, c1, n_classes, eps, cdt, dev)
            acc = acc + (ref_old - ref_new) * a_sum + (a * (z - ref_new[:, None])).sum(1)
            a_sum = a_sum + a.sum(1)
        m = m_new
    zy = torch.zeros_like(s)
    if soft is None:
        owned = (tgt >= 0) & (tgt < C)
        x_y = reference._target_gather(x3, torch.where(owned, tgt, torch.zeros_like(tgt)), cdt)
        zy = torch.where(owned, reference._transform(x_y, logit_scale, softcap), zy)
    return torch.stack([m, s, acc, a_sum, zy], dim=1)


def shard_partials(x3: Tensor, tgt: Tensor, w: Optional[Tensor], n_classes: int, eps: float,
                   softcap: float, logit_scale: float) -> Tensor:
    """(R, 5) partials (m, s, A, a_sum, z_y) of the shard's (N, C_local, D) logits ``x3``.

    ``tgt``: localized int64 (R,) ids, or the shard of a soft target ((N, C_local, D) view);
    ``w``: the shard's slice of the class weights; ``n_classes``: the global C.
    fp32 (float64 for float64 logits).
    """
    if not ops.uses_triton(x3):
        return _partials_torch(x3, tgt, w, n_classes, eps, softcap, logit_scale)
    from .kernels.vocab_parallel import vocab_parallel_fwd_kernel

    N, C, D = x3.shape
    R = N * D
    part = ops._alloc((R, N_PARTIALS), torch.float32, x3.device)
    if R == 0:
        return part
    soft = tgt.is_floating_point()
    soft_t = tgt if soft else x3  # placeholder pointers are never dereferenced
    cfg = config(C)
    vocab_parallel_fwd_kernel[(R,)](
        x_ptr=x3, stride_xn=x3.stride(0), stride_xd=x3.stride(2), stride_xc=x3.stride(1),
        tgt_ptr=x3 if soft else tgt, w_ptr=w if w is not None else x3,
        soft_ptr=soft_t, stride_tn=soft_t.stride(0), stride_td=soft_t.stride(2),
        stride_tc=soft_t.stride(1), part_ptr=part, C=C, D=D, n_classes=n_classes,
        label_smoothing=eps, softcap=softcap, logit_scale=logit_scale,
        HAS_WEIGHT=w is not None, HAS_SMOOTHING=eps > 0, SOFT_TARGET=soft, HAS_SOFTCAP=softcap > 0,
        BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )
    return part


def merge_splits(part: Tensor) -> Tensor:
    """(5, S, R) partials of S disjoint class ranges of ONE rank (e.g. the class splits of the
    fused linear head) -> the (R, 5) partials of their union, as ``combine_partials`` takes them."""
    m, s, acc, a_sum, z_y = part.unbind(0)
    m_r = m.amax(0)
    ref_r = reference._safe_ref(m_r)
    s_r = (s * torch.exp(m - ref_r)).sum(0)  # exactly 0 for a split with m = -inf
    acc_r = (acc + (reference._safe_ref(m) - ref_r) * a_sum).sum(0)
    return torch.stack([m_r, s_r, acc_r, a_sum.sum(0), z_y.sum(0)], dim=1)


# ------------------------------------------------------------------------------- the combination
def combine_partials(part: Tensor, target: Tensor, local_target: Optional[Tensor],
                     weight: Optional[Tensor], shard: VocabShard, group: Any, ignore_index: int,
                     eps: float, zl: float) -> tuple[Tensor, Tensor, Tensor]:
    """Global per-row (loss, lse, stats) from this rank's (R, 5) partials; two collectives on O(R)
    data (``all_reduce`` MAX of m, then SUM of the rescaled partials). Identical on every rank.

    ``target``: global int64 ids (R,) or the soft-target shard; ``local_target``: its localized
    form (hard targets); ``weight``: the global (C_global,) class weights or None.
    stats = (ref_g, log s_g, row weight) is what the shard backward needs (see module docstring).
    """
    soft = target.is_floating_point()
    n = shard.n_classes
    m = part[:, M]
    m_g = m.clone(memory_format=torch.contiguous_format)  # a dense copy: collectives write in place
    dist.all_reduce(m_g, op=dist.ReduceOp.MAX, group=group)
    ref_g = reference._safe_ref(m_g)
    shift = reference._safe_ref(m) - ref_g  # <= 0; only differences of maxima, never an lse
    cols = [part[:, S] * torch.exp(m - ref_g)]  # m = -inf (an all -inf shard) gives exactly 0
    if soft:
        cols += [part[:, A] + part[:, ASUM] * shift, part[:, ASUM]]
    else:
        owned = (local_target >= 0) & (local_target < shard.size)
        cols.append(torch.where(owned, part[:, ZY] - ref_g, torch.zeros_like(ref_g)))
        if eps > 0:
            cols.append(part[:, A] + part[:, ASUM] * shift)
    tot = torch.stack(cols, dim=1)
    dist.all_reduce(tot, op=dist.ReduceOp.SUM, group=group)
    log_s = torch.log(tot[:, 0])
    lse = ref_g + log_s
    if soft:
        row_w = tot[:, 2]
        loss = row_w * log_s - tot[:, 1] + zl * lse * lse
    else:
        valid = target != ignore_index
        in_range = (target >= 0) & (target < n)
        ok, bad = valid & in_range, valid & ~in_range
        y_safe = torch.where(ok, target, torch.zeros_like(target))
        w_y = weight.to(m.dtype)[y_safe] if weight is not None else torch.ones_like(m)
        loss = (1 - eps) * w_y * (log_s - tot[:, 1]) + zl * lse * lse
        if eps > 0:
            wsum = weight.to(m.dtype).sum() if weight is not None else n
            loss = loss + eps / n * (wsum * log_s - tot[:, 2])
        zero, nan = torch.zeros_like(loss), torch.full_like(loss, float("nan"))
        row_w = torch.where(bad, nan, torch.where(ok, w_y, zero))  # NaN: no host sync on CUDA
        loss = torch.where(bad, nan, torch.where(ok, loss, zero))
    return loss, lse, torch.stack([ref_g, log_s, row_w], dim=1)


# ------------------------------------------------------------------------------------- backward
def _backward_torch(out, x3, tgt, w, wsum, stats, dloss, dlse, n_classes, eps, zl, softcap,
                    logit_scale) -> None:
    """The shard backward with chunked torch ops: the reference's, with the global C and sum(w)."""
    reference.backward_rows(x3, tgt, w, stats, dloss, dlse, IGNORED, eps, zl, softcap, logit_scale,
                            out, n_classes=n_classes, weight_sum=wsum)


def shard_backward_into(out: Tensor, x3: Tensor, tgt: Tensor, w: Optional[Tensor],
                        wsum: Optional[Tensor], stats: Tensor, dloss: Tensor, dlse: Optional[Tensor],
                        n_classes: int, eps: float, zl: float, softcap: float,
                        logit_scale: float) -> None:
    """dL/dx of the shard into ``out`` (may be ``x3``): ``cross_entropy_bwd_kernel`` unchanged,
    with the global stats, the localized target (ignore_index = ``IGNORED``), the shard's weight
    slice ``w``, the global weight sum ``wsum`` ((1,) tensor) and ``n_classes`` = C_global."""
    if not ops.uses_triton(x3):
        _backward_torch(out, x3, tgt, w, wsum, stats, dloss, dlse, n_classes, eps, zl, softcap,
                        logit_scale)
        return
    from .kernels.cross_entropy import cross_entropy_bwd_kernel

    N, C, D = x3.shape
    if N * D == 0:
        return
    soft = tgt.is_floating_point()
    soft_t = tgt if soft else x3
    h = dlse if dlse is not None else dloss
    cfg = config(C)
    grid, span = backward_grid(N * D, C, cfg.block_c)
    cross_entropy_bwd_kernel[grid](
        x_ptr=x3, stride_xn=x3.stride(0), stride_xd=x3.stride(2), stride_xc=x3.stride(1),
        dx_ptr=out, stride_gn=out.stride(0), stride_gd=out.stride(2), stride_gc=out.stride(1),
        tgt_ptr=x3 if soft else tgt, w_ptr=w if w is not None else x3,
        wsum_ptr=wsum if wsum is not None else x3,
        soft_ptr=soft_t, stride_tn=soft_t.stride(0), stride_td=soft_t.stride(2),
        stride_tc=soft_t.stride(1), stats_ptr=stats, dloss_ptr=dloss, stride_dloss=dloss.stride(0),
        dlse_ptr=h, stride_dlse=h.stride(0), C=C, D=D, n_classes=n_classes, ignore_index=IGNORED,
        span=span, label_smoothing=eps, lse_square_scale=zl, softcap=softcap,
        logit_scale=logit_scale, HAS_WEIGHT=w is not None, HAS_SMOOTHING=eps > 0,
        SOFT_TARGET=soft, HAS_SOFTCAP=softcap > 0, HAS_DLSE=dlse is not None,
        BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
        **({} if interpreting() else backward_compile_options(vector_friendly(x3, out, soft_t))),
    )


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Eager autograd: forward = shard partials + 2 collectives + O(R) math; backward = local."""

    @staticmethod
    def forward(ctx, x3, target, weight, shard, group, ignore_index, eps, zl, softcap, logit_scale,
                inplace_backward):
        soft = target.is_floating_point()
        tgt = target if soft else localize_target(target, shard, ignore_index)
        # a fresh (16-byte aligned) copy of the shard's weights: C_local floats
        w_local = weight[shard.start:shard.start + shard.size].clone() if weight is not None else None
        part = shard_partials(x3, tgt, w_local, shard.n_classes, eps, softcap, logit_scale)
        loss, lse, stats = combine_partials(part, target, None if soft else tgt, weight, shard, group,
                                            ignore_index, eps, zl)
        wsum = weight.sum(dtype=part.dtype).reshape(1) if weight is not None else None
        ctx.save_for_backward(x3, tgt, w_local, wsum, stats)
        ctx.hparams = (shard.n_classes, eps, zl, softcap, logit_scale)
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return loss.float(), lse.float(), stats  # float32 loss/lse like the core (stats: compute dtype)

    @staticmethod
    def backward(ctx, dloss, dlse, _dstats):
        x3, tgt, w_local, wsum, stats = ctx.saved_tensors
        if dloss is None:
            dloss = torch.zeros((), dtype=stats.dtype, device=x3.device).expand(stats.shape[0])
        out = x3 if ctx.inplace_backward else ops._alloc(x3.shape, x3.dtype, x3.device)
        shard_backward_into(out, x3, tgt, w_local, wsum, stats, dloss, dlse, *ctx.hparams)
        return out, None, None, None, None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(*args, **kwargs):
    """``cross_entropy`` over a vocabulary shard (called by it when ``process_group`` is given).

    Runs eagerly even inside ``torch.compile``: a graph break around the call (collectives inside
    an eager autograd.Function); torch._dynamo is only touched when already compiling.
    """
    if ops._is_compiling():
        return torch.compiler.disable(_vocab_parallel_eager)(*args, **kwargs)
    return _vocab_parallel_eager(*args, **kwargs)


def _vocab_parallel_eager(input: Tensor, target: Tensor, weight: Optional[Tensor],
                          ignore_index: int, reduction: str, label_smoothing: float, *,
                          lse_square_scale: float, softcap: Optional[float],
                          logit_scale: float, inplace_backward: bool, return_lse: bool,
                          process_group: Any, vocab_start_index: Optional[int] = None):
    from .functional import _canonical, check_options, check_target_range, check_weight

    check_options(reduction, label_smoothing, lse_square_scale, softcap, logit_scale)
    if not isinstance(input, Tensor) or input.dim() == 0:
        raise ValueError("input must be a tensor of shape (C), (N, C) or (N, C, d1, ..., dK)")
    local_c = input.shape[0] if input.dim() == 1 else input.shape[1]
    wlen = -1 if weight is None else (weight.numel() if isinstance(weight, Tensor) else -2)
    shard = vocab_shard(process_group, local_c, input.device, vocab_start_index, wlen)
    x3, tgt, out_shape, _ = _canonical(input, target)
    w = check_weight(weight, shard.n_classes, input.device)
    if not tgt.is_floating_point():
        check_target_range(tgt, shard.n_classes, int(ignore_index))
    loss_rows, lse, stats = VocabParallelCrossEntropyFunction.apply(
        x3, tgt, w, shard, process_group, int(ignore_index), float(label_smoothing),
        float(lse_square_scale), float(softcap) if softcap is not None else 0.0, float(logit_scale),
        bool(inplace_backward))
    loss = reduce_rows(loss_rows, stats, reduction, tgt.is_floating_point(), out_shape)
    return (loss, lse.view(out_shape)) if return_lse else loss
