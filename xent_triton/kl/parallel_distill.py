"""Vocabulary-parallel ``distillation_loss``: student and teacher class-sharded on ONE layout.

Communication per call (R rows; module docstring of ``kl/parallel.py`` for the whole scheme):
the layout/options ``all_gather``; ``all_reduce(MAX)`` of the row maxima of teacher / T and
student / T (+ the student at T = 1 when ce_weight > 0): 2-3 R floats; ``all_reduce(SUM)`` of the
rescaled sums (+ the owner's label logit): 2-4 R floats; ``all_reduce(SUM)`` of the shard's
divergence terms in float64 (1 R for kl / reverse_kl, 2 R for jsd). Backward: local, given the
global statistics (the single-device torch backward ``rows_torch.distill_backward`` on the shard).
The shard is processed with torch ops in the compute dtype: N x C_local temporaries.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.exchange import VocabShard, exchange_device, vocab_shard
from ..core.inputs import class_ids, target_range_check
from ..core.options import REDUCTIONS
from ..core.runtime import alloc, compute_dtype, is_compiling, no_second_derivative
from . import rows_torch
from .ops import DISTILL_FLAT
from .options import DIVERGENCES, kl_from_flat
from .parallel import check_shard_logits, localize, owner_gather
from .rows_torch import JSD, KL, REVERSE_KL, mixture_excess, mixture_gaps, xlogy_ratio


def row_max(z: Tensor) -> Tensor:
    if z.shape[1] == 0:
        return torch.full((z.shape[0],), float("-inf"), dtype=z.dtype, device=z.device)
    return z.amax(1)


class VocabParallelDistill(torch.autograd.Function):
    """forward: the shard's terms + 3 all-reduces of O(R); backward: local."""

    @staticmethod
    def forward(ctx, x2: Tensor, t2: Tensor, labels: Optional[Tensor], shard: VocabShard, group: Any,
                divergence: int, beta: float, temperature: float, ignore_index: int, ce_weight: float):
        R, C = x2.shape
        cdt = compute_dtype(x2)
        xs = x2.to(cdt)
        a, b = t2.to(cdt) / temperature, xs / temperature
        use_ce = labels is not None and ce_weight != 0
        zs = [a, b] + ([xs] if use_ce else [])
        m = torch.stack([row_max(z) for z in zs])
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        ref = rows_torch.safe_ref(m)
        sums = [torch.exp(z - ref[i][:, None]).sum(1) for i, z in enumerate(zs)]
        loc = localize(labels, shard) if labels is not None else None
        if use_ce:
            sums.append(torch.where(loc >= 0, owner_gather(xs, loc) - ref[2], torch.zeros_like(ref[2])))
        pack = torch.stack(sums)
        dist.all_reduce(pack, op=dist.ReduceOp.SUM, group=group)
        log_s = torch.log(pack[:len(zs)])
        logp = rows_torch.log_softmax_from(a, ref[0], log_s[0])
        logq = rows_torch.log_softmax_from(b, ref[1], log_s[1])
        p, q = torch.exp(logp), torch.exp(logq)
        f64 = torch.float64
        zero = torch.zeros_like(p)
        if divergence == KL:
            terms = [xlogy_ratio(p, logp, logq).sum(-1, dtype=f64)]
        elif divergence == REVERSE_KL:  # W = sum q w, w = (b - ref_q) - (a - ref_p): the saved extra
            w = (b - ref[1][:, None]) - (a - ref[0][:, None])
            terms = [torch.where(q > 0, q * w, zero).sum(-1, dtype=f64)]
        else:  # and H = sum q h (h = mixture_excess): the saved extra (kl/distill_kernels.py)
            gap_p, gap_q = mixture_gaps(logp, logq, beta)
            terms = [torch.where(p > 0, p * gap_p, zero).sum(-1, dtype=f64),
                     torch.where(q > 0, q * gap_q, zero).sum(-1, dtype=f64),
                     torch.where(q > 0, q * mixture_excess(logp, logq, beta), zero).sum(-1, dtype=f64)]
        div_sums = torch.stack(terms)
        dist.all_reduce(div_sums, op=dist.ReduceOp.SUM, group=group)
        extra = torch.zeros_like(ref[0])
        if divergence == KL:
            div = div_sums[0].to(cdt)
        elif divergence == REVERSE_KL:  # D = W + log s_p - log s_q (the kernel's forward)
            extra = div_sums[0].to(cdt)
            div = extra + (log_s[0] - log_s[1])
        else:
            extra = div_sums[2].to(cdt)
            div = beta * div_sums[0].to(cdt) + (1 - beta) * div_sums[1].to(cdt)
        ok = torch.ones(R, dtype=torch.bool, device=x2.device) if labels is None else labels != ignore_index
        loss = div
        ref_1, log_s1 = (ref[2], log_s[2]) if use_ce else (torch.zeros_like(extra), torch.zeros_like(extra))
        if use_ce:
            loss = ce_weight * (log_s1 - pack[3]) + (1 - ce_weight) * div
        loss = torch.where(ok, loss, torch.zeros_like(loss))
        stats = torch.stack([ref[0], log_s[0], ref[1], log_s[1], ref_1, log_s1, extra, ok.to(cdt)], dim=1)
        ctx.save_for_backward(x2, t2, loc, stats)
        ctx.flat = (divergence, beta, temperature, ignore_index, ce_weight, use_ce)
        ctx.set_materialize_grads(False)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        x2, t2, loc, stats = ctx.saved_tensors
        divergence, beta, temperature, ignore_index, ce_weight, use_ce = ctx.flat
        none = (None,) * 9
        if dloss is None or x2.shape[1] == 0 or x2.shape[0] == 0:
            out = torch.zeros_like(x2) if dloss is None else alloc(x2.shape, x2.dtype, x2.device)
            return (no_second_derivative(out, "distillation_loss"),) + none
        ok = stats[:, 7] > 0
        g = torch.where(ok, dloss.to(stats.dtype), torch.zeros_like(stats[:, 7]))
        opts = kl_from_flat(DISTILL_FLAT, (divergence, beta, temperature, ignore_index, ce_weight, 0.0))
        dx = rows_torch.distill_backward(x2, t2, None, stats, g, opts).to(stats.dtype)
        if use_ce:  # g alpha (softmax(x)_j - [j = label]), the softmax from the global (ref_1, log s_1)
            sm1 = torch.exp(rows_torch.log_softmax_from(x2.to(stats.dtype), stats[:, 4], stats[:, 5]))
            onehot = torch.arange(x2.shape[1], device=x2.device)[None, :] == loc[:, None]
            dx = dx + (g * ce_weight)[:, None] * (sm1 - onehot.to(sm1.dtype))
        return (no_second_derivative(dx.to(x2.dtype), "distillation_loss"),) + none


def vocab_parallel_distillation_rows(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor],
                                     chosen: Optional[tuple], process_group: Any,
                                     vocab_start_index: Optional[int] = None,
                                     extra_agree: Optional[dict] = None,
                                     options_error: Optional[BaseException] = None
                                     ) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token full-vocabulary ``distillation_loss`` (R,) over a class shard, before the
    reduction, and the flat int64 labels (or None): the caller reduces (``reduce_tokens``).

    ``student_logits`` / ``teacher_logits``: this rank's (..., C_local) slices on the same layout
    (a teacher shard of another width on any rank raises on every rank); ``labels``: GLOBAL ids;
    ``chosen``: the validated ``KLOptions`` (``options.make_kl``; None when it raised: its error is
    ``options_error``, raised after the exchange); ``extra_agree``: more values that must agree across ranks.
    """
    args = (student_logits, teacher_logits, labels, chosen, process_group, vocab_start_index,
            extra_agree or {}, options_error)
    if is_compiling():
        return torch.compiler.disable(_distill)(*args)
    return _distill(*args)


AGREED = ("divergence", "beta", "temperature", "ce_weight", "reduction", "ignore_index", "empty_batch",
          "labels")


def _distill(student_logits, teacher_logits, labels, chosen, process_group, vocab_start_index, extra_agree,
             options_error):
    local_error, lbl, C_local = options_error, None, 0
    try:
        check_shard_logits("input", student_logits)
        check_shard_logits("teacher_input", teacher_logits)
        C_local = student_logits.shape[-1]
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher_input shape {tuple(teacher_logits.shape)} != input shape "
                             f"{tuple(student_logits.shape)}: student and teacher must share one layout")
        if teacher_logits.device != student_logits.device:
            raise ValueError("teacher_input and input must be on the same device")
        if labels is not None:
            lbl = class_ids(labels, student_logits.shape[:-1], "input's leading shape")
    except (TypeError, ValueError, IndexError) as e:  # raised after the exchange: no rank hangs
        local_error = local_error or e
    if chosen is not None:  # the validated KLOptions (options.make_kl)
        opts = chosen
        div, beta, temperature, ce_weight = (DIVERGENCES.index(opts.divergence), opts.beta, opts.temperature,
                                             opts.ce_weight)
        values = (div, beta if div == JSD else 0.0, temperature, ce_weight,
                  float(REDUCTIONS.index(opts.reduction)), opts.ignore_index,
                  float(opts.empty_batch == "zero"), float(labels is not None))
    else:
        values = (0.0,) * len(AGREED)
    agree = dict(zip(AGREED, values), **extra_agree)
    shard = vocab_shard(process_group, C_local, exchange_device(process_group, student_logits),
                        vocab_start_index, agree, "vocab-parallel distillation_loss", True, local_error)
    if lbl is not None:
        target_range_check(lbl, shard.n_classes, opts.ignore_index)
    rows = student_logits.shape[:-1].numel()
    loss_rows = VocabParallelDistill.apply(
        student_logits.reshape(rows, C_local), teacher_logits.detach().reshape(rows, C_local), lbl, shard,
        process_group, div, beta, temperature, opts.ignore_index, ce_weight)
    return loss_rows, lbl
