"""Vocabulary-parallel ``linear_token_logprobs`` and ``linear_distillation_loss``: class-sharded heads.

Rank r holds the head rows ``W[start:start + C_local]`` (and bias slice) of ``process_group``'s
layout; hidden states and GLOBAL token / label ids are the same on every rank. Chunked over tokens
as the single-device forms (``kl/linear.py``): per chunk of ``chunk_size`` rows the shard's logits
are formed into a reused (chunk, C_local) buffer (one per model) and the shard pass of the
logits-level code (``kl/parallel.py``'s ``logprobs_local``, ``kl/parallel_distill.py``'s
``distill_local``) keeps O(1) values per row; then the same O(N) forward collectives combine them
(jsd forms the chunks' logits a second time for its terms under the global normalisation). The
backward forms each chunk's logits again, writes their gradient over the buffer and turns it into
dX rows and fp32 dW, db (``kl/linear_ops.Grads``). Nothing N x C_local exists beyond one chunk per model.

Ignored tokens cost no FLOPs, as on one device (``kl/linear_ops.py``): the rows whose label /
token is ``ignore_index`` are compacted away (``core/compaction.py``) before the autograd
functions, so neither their GEMMs nor their O(N) collectives (nor their rows of the dX all-reduce)
run; their outputs are 0 and their gradient rows 0. Every rank holds the same tokens, so each
computes the same kept rows; the count (one host sync, as ``kept_rows``) joins the layout
exchange's agreement (``kept_tokens``; and the log-probs' ``ignore_index``), so ranks whose masks
differ in size (or one rank under ``XENT_COMPACT=0``) raise the same ValueError instead of
entering collectives of different sizes. With compaction off (``XENT_COMPACT=0``) every row
runs and the ignored ones are masked afterwards.

The input gradient is summed over the group in backward by one ``all_reduce(SUM)`` of fp32
(float64 for float64) dX (N x D) (``core.exchange.ReduceGradOver``), as the CE linear head
(``linear/parallel.py``) and Megatron's ``copy_to_tensor_model_parallel_region`` do. Whether the
input needs a gradient is agreed in the layout exchange (so every rank enters that all-reduce or
none). The teacher head is a constant.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..core.compaction import kept_rows, scatter_rows, take_rows
from ..core.exchange import ReduceGradOver, VocabShard, exchange_device, vocab_shard
from ..core.inputs import autocast_operands, class_ids, target_range_check
from ..core.op_schema import input_grads
from ..core.runtime import compute_dtype, is_compiling, no_second_derivative
from ..linear.chunked import logits_into
from .linear_ops import Grads, chunked, rows
from .options import DIVERGENCES, KLOptions
from .parallel import localize, logprobs_combine, logprobs_local, logprobs_shard_backward_into
from .parallel_distill import (
    distill_agreement,
    distill_combine,
    distill_local,
    distill_shard_backward_into,
    jsd_terms,
)

STUDENT = ("input", "linear_weight", "linear_bias")
TEACHER = ("teacher_input", "teacher_linear_weight", "teacher_linear_bias")


def check_shard_head(names: tuple[str, str, str], h: Tensor, w: Tensor, b: Optional[Tensor],
                     classes: str = "C_local") -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The head's (hidden, weight, bias), named ``names`` in errors (W (``classes``, D); a shard may hold
    no class); under ``torch.autocast`` cast to the autocast dtype as ``F.linear`` computes them."""
    hn, wn, bn = names
    for what, t in ((hn, h), (wn, w)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor")
    h, w, b = autocast_operands(h, w, b)
    if h.dim() < 1 or w.dim() != 2 or h.shape[-1] != w.shape[1]:
        raise ValueError(f"{hn} (..., D) and {wn} ({classes}, D) do not match: {tuple(h.shape)} vs "
                         f"{tuple(w.shape)}")
    if w.dtype != h.dtype or w.device != h.device:
        raise ValueError(f"{wn} must have {hn}'s dtype and device (outside torch.autocast)")
    if b is not None and (b.shape != (w.shape[0],) or b.dtype != h.dtype):
        raise ValueError(f"{bn} must be ({w.shape[0]},) of {hn}'s dtype")
    return h, w, b


def chunk_rows(chunk_size: int, N: int, C: int) -> int:
    """Tokens per chunk: ``chunk_size`` (validated by ``make_kl``), 0 = automatic (``chunked``)."""
    return chunked(KLOptions(chunk_size=chunk_size), N, C).chunk_size


def chunks(N: int, chunk: int):
    for r0 in range(0, N, chunk):
        yield r0, min(N, r0 + chunk)


class VocabParallelLinearLogprobs(torch.autograd.Function):
    """forward: the shard pass chunk by chunk + MAX + SUM all-reduces (O(N)); backward: local."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Optional[Tensor], tokens: Tensor, shard: VocabShard,
                group: Any, temperature: float, entropy: bool, chunk: int, softcap: float,
                accum_fp32: bool = True):
        N, C = x.shape[0], w.shape[0]
        loc = localize(tokens, shard)
        local = torch.zeros((N, 4), dtype=compute_dtype(x), device=x.device)
        z = x.new_empty((min(chunk, N), C))
        for r0, r1 in chunks(N, chunk):
            zc = logits_into(z[:r1 - r0], x[r0:r1], w, b)
            local[r0:r1] = logprobs_local(zc, loc[r0:r1], temperature, entropy, scratch=True, softcap=softcap)
        lp, ent, stats = logprobs_combine(local, loc, tokens, shard.n_classes, group, entropy)
        ctx.save_for_backward(x, w, b, loc, ent, stats)
        ctx.flat = (temperature, chunk, softcap, accum_fp32)
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    def backward(ctx, dlp, dent):
        x, w, b, loc, ent, stats = ctx.saved_tensors
        temperature, chunk, softcap, accum_fp32 = ctx.flat
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
        grads = Grads(x, w, *need, accum_fp32=accum_fp32)
        N, C = x.shape[0], w.shape[0]
        z = x.new_empty((min(chunk, N), C))
        for r0, r1 in chunks(N, chunk):
            zc = logits_into(z[:r1 - r0], x[r0:r1], w, b)
            logprobs_shard_backward_into(zc, zc, loc[r0:r1], ent[r0:r1] if dent is not None else ent,
                                         stats[r0:r1], None if dlp is None else dlp[r0:r1],
                                         None if dent is None else dent[r0:r1], temperature, softcap)
            grads.add(zc, x, w, r0, r1)
        return input_grads(ctx, *(no_second_derivative(g, "linear_token_logprobs") if n else None
                                   for g, n in zip(grads.result(x), need)))


class VocabParallelLinearDistill(torch.autograd.Function):
    """forward: the shard pass chunk by chunk (twice for jsd) + 3 all-reduces of O(N); backward:
    local, chunk by chunk."""

    @staticmethod
    def forward(ctx, xs: Tensor, ws: Tensor, bs: Optional[Tensor], xt: Tensor, wt: Tensor,
                bt: Optional[Tensor], labels: Optional[Tensor], shard: VocabShard, group: Any,
                divergence: int, beta: float, temperature: float, ignore_index: int, ce_weight: float,
                chunk: int, softcap: float, accum_fp32: bool = True):
        N, C = xs.shape[0], ws.shape[0]
        use_ce = labels is not None and ce_weight != 0
        loc = localize(labels, shard) if labels is not None else None
        zs, zt = xs.new_empty((min(chunk, N), C)), xt.new_empty((min(chunk, N), C))

        def logits(r0: int, r1: int) -> tuple[Tensor, Tensor]:
            return (logits_into(zs[:r1 - r0], xs[r0:r1], ws, bs),
                    logits_into(zt[:r1 - r0], xt[r0:r1], wt, bt))

        local = torch.zeros((N, 8), dtype=compute_dtype(xs), device=xs.device)
        for r0, r1 in chunks(N, chunk):
            local[r0:r1] = distill_local(*logits(r0, r1), None if loc is None else loc[r0:r1], divergence,
                                         beta, temperature, use_ce, softcap)

        def terms(st: Tensor) -> Tensor:  # jsd: the chunks' logits again, under the global stats
            out = torch.empty((N, 3), dtype=torch.float64, device=xs.device)
            for r0, r1 in chunks(N, chunk):
                out[r0:r1] = jsd_terms(*logits(r0, r1), st[r0:r1], beta, temperature, softcap)
            return out

        loss, stats = distill_combine(local, loc, labels, group, divergence, beta, ignore_index, ce_weight,
                                      use_ce, terms)
        ctx.save_for_backward(xs, ws, bs, xt, wt, bt, labels, stats)
        ctx.flat = (shard, divergence, beta, temperature, ignore_index, ce_weight, use_ce, chunk, softcap)
        ctx.accum_fp32 = accum_fp32
        ctx.set_materialize_grads(False)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        xs, ws, bs, xt, wt, bt, labels, stats = ctx.saved_tensors
        shard, divergence, beta, temperature, ignore_index, ce_weight, use_ce, chunk, softcap = ctx.flat
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bs is not None and ctx.needs_input_grad[2])
        grads = Grads(xs, ws, *need, accum_fp32=ctx.accum_fp32)
        N, C = xs.shape[0], ws.shape[0]
        if dloss is None:
            dloss = torch.zeros((), dtype=stats.dtype, device=xs.device).expand(N)
        zs, zt = xs.new_empty((min(chunk, N), C)), xt.new_empty((min(chunk, N), C))
        for r0, r1 in chunks(N, chunk):
            zsc = logits_into(zs[:r1 - r0], xs[r0:r1], ws, bs)
            ztc = logits_into(zt[:r1 - r0], xt[r0:r1], wt, bt)
            distill_shard_backward_into(zsc, zsc, ztc, None if labels is None else labels[r0:r1], shard,
                                        stats[r0:r1], dloss[r0:r1], divergence, beta, temperature,
                                        ignore_index, ce_weight, use_ce, softcap)
            grads.add(zsc, xs, ws, r0, r1)
        return input_grads(ctx, *(no_second_derivative(g, "linear_distillation_loss") if n else None
                                   for g, n in zip(grads.result(xs), need)))


def reduced_input(h: Tensor, group: Any, needs_dx: bool, idx: Optional[Tensor] = None) -> Tensor:
    """(N, D) rows of the hidden states (the kept rows ``idx`` only, when given), their gradient
    summed over ``group`` in backward."""
    x = take_rows(rows(h), idx)
    return ReduceGradOver.apply(x, [group]) if needs_dx else x


def kept_count(ids: Optional[Tensor], ignore_index: int) -> tuple[Optional[Tensor], float]:
    """(kept rows or None, how many rows the collectives will carry: the agreement's ``kept_tokens``)."""
    if ids is None:
        return None, 0.0
    idx = kept_rows(ids != ignore_index)
    return idx, float(ids.numel() if idx is None else idx.numel())


def vocab_parallel_linear_token_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor,
                                         bias: Optional[Tensor], temperature: float, return_entropy: bool,
                                         process_group: Any, vocab_start_index: Optional[int] = None,
                                         error: Optional[BaseException] = None,
                                         extra_agree: Optional[dict] = None, chunk_size: int = 0,
                                         softcap: float = 0.0, accum_fp32: bool = True,
                                         ignore_index: int = -100) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``linear_token_logprobs`` with ``weight`` / ``bias`` this rank's class shard (called by it;
    ``temperature`` validated there, ``error`` its validation error, raised on every rank;
    ``extra_agree``: more values every rank must share; ``chunk_size``: tokens per chunk, 0 =
    automatic, validated by ``make_kl``; ``softcap``: 0.0 none, agreed on; ``ignore_index``: a
    token equal to it gets log-prob 0, entropy 0 and no gradient, at no FLOP; agreed on)."""
    args = (hidden, weight, tokens, bias, temperature, return_entropy, process_group, vocab_start_index,
            error, extra_agree or {}, chunk_size, softcap, accum_fp32, ignore_index)
    if is_compiling():  # collectives inside an eager autograd.Function: a graph break
        return torch.compiler.disable(_linear_logprobs)(*args)
    return _linear_logprobs(*args)


def _linear_logprobs(hidden, weight, tokens, bias, temperature, return_entropy, group, vocab_start_index,
                     error, extra_agree, chunk_size, softcap, accum_fp32=True, ignore_index=-100):
    C_local, chunk, tok, idx, kept = 0, 1, None, None, 0.0
    try:
        hidden, weight, bias = check_shard_head(STUDENT, hidden, weight, bias)
        C_local = weight.shape[0]
        tok = class_ids(tokens, hidden.shape[:-1], "input's leading shape")
        chunk = chunk_rows(chunk_size, tok.numel(), C_local)
        idx, kept = kept_count(tok, ignore_index)
    except (TypeError, ValueError, IndexError) as e:  # raised after the exchange, on every rank
        error = error or e
    needs_dx = isinstance(hidden, Tensor) and hidden.requires_grad
    agree = dict(temperature=temperature if error is None else 0.0,
                 return_entropy=float(bool(return_entropy)), input_requires_grad=float(needs_dx),
                 softcap=softcap if error is None else 0.0, ignore_index=ignore_index, kept_tokens=kept,
                 **extra_agree)
    shard = vocab_shard(group, C_local, exchange_device(group, hidden), vocab_start_index, agree,
                        "vocab-parallel linear_token_logprobs", True, error)
    target_range_check(tok, shard.n_classes, ignore_index)
    lp, ent = VocabParallelLinearLogprobs.apply(reduced_input(hidden, group, needs_dx, idx), weight, bias,
                                                take_rows(tok, idx), shard, group, temperature,
                                                bool(return_entropy), chunk, softcap, accum_fp32)
    N = tok.numel()
    if idx is not None:
        lp = scatter_rows(lp, idx, N)
        ent = scatter_rows(ent, idx, N) if return_entropy else ent
    else:  # every row ran (none ignored, or XENT_COMPACT=0): an ignored token's outputs are 0
        keep = tok != ignore_index
        lp = torch.where(keep, lp, torch.zeros_like(lp))
        ent = torch.where(keep, ent, torch.zeros_like(ent)) if return_entropy else ent
    shape = hidden.shape[:-1]
    return (lp.view(shape), ent.view(shape)) if return_entropy else lp.view(shape)


def vocab_parallel_linear_distillation_rows(student_hidden: Tensor, student_weight: Tensor,
                                            teacher_hidden: Tensor, teacher_weight: Tensor,
                                            labels: Optional[Tensor], student_bias: Optional[Tensor],
                                            teacher_bias: Optional[Tensor], chosen: Optional[KLOptions],
                                            process_group: Any, vocab_start_index: Optional[int] = None,
                                            error: Optional[BaseException] = None,
                                            extra_agree: Optional[dict] = None
                                            ) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token ``linear_distillation_loss`` (R,) and the flat labels with both heads this rank's
    class shard (same layout); the caller reduces. ``chosen`` / ``error``: as
    ``vocab_parallel_distillation_rows`` (``chosen.chunk_size``: tokens per chunk, 0 = automatic);
    ``extra_agree``: as ``vocab_parallel_linear_token_logprobs``."""
    args = (student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
            teacher_bias, chosen, process_group, vocab_start_index, error, extra_agree or {})
    if is_compiling():
        return torch.compiler.disable(_linear_distill)(*args)
    return _linear_distill(*args)


def _linear_distill(hs, ws, ht, wt, labels, bs, bt, chosen, group, vocab_start_index, error, extra_agree):
    C_local, chunk, lbl = 0, 1, None
    try:
        hs, ws, bs = check_shard_head(STUDENT, hs, ws, bs)
        ht, wt, bt = check_shard_head(TEACHER, ht, wt, bt)
        if ws.shape[0] != wt.shape[0]:
            raise ValueError(f"student and teacher head shards have different class counts: {ws.shape[0]} "
                             f"vs {wt.shape[0]}: they must share one layout")
        if ht.shape[:-1] != hs.shape[:-1]:
            raise ValueError(f"teacher_input's leading shape {tuple(ht.shape[:-1])} != input's "
                             f"{tuple(hs.shape[:-1])}")
        C_local = ws.shape[0]
        if labels is not None:
            lbl = class_ids(labels, hs.shape[:-1], "input's leading shape")
        chunk = chunk_rows(chosen.chunk_size if chosen is not None else 0, hs.shape[:-1].numel(), C_local)
    except (TypeError, ValueError, IndexError) as e:  # raised after the exchange, on every rank
        error = error or e
    idx, kept = kept_count(lbl, chosen.ignore_index if chosen is not None else -100)
    needs_dx = isinstance(hs, Tensor) and hs.requires_grad
    agree = distill_agreement(chosen, labels is not None,
                              dict(input_requires_grad=float(needs_dx), kept_tokens=kept, **extra_agree))
    shard = vocab_shard(group, C_local, exchange_device(group, hs), vocab_start_index, agree,
                        "vocab-parallel linear_distillation_loss", True, error)
    opts = chosen  # not None: vocab_shard raised its error otherwise
    assert opts is not None
    if lbl is not None:
        target_range_check(lbl, shard.n_classes, opts.ignore_index)
    loss = VocabParallelLinearDistill.apply(
        reduced_input(hs, group, needs_dx, idx), ws, bs, take_rows(rows(ht.detach()), idx), wt.detach(),
        None if bt is None else bt.detach(), take_rows(lbl, idx), shard, group,
        DIVERGENCES.index(opts.divergence), opts.beta, opts.temperature, opts.ignore_index, opts.ce_weight,
        chunk, opts.softcap, opts.accum_fp32)
    if idx is not None:
        loss = scatter_rows(loss, idx, hs.shape[:-1].numel())
    return loss, lbl
