"""Vocabulary-parallel ``distillation_loss``: student and teacher class-sharded on ONE layout.

Communication per call (R rows; module docstring of ``kl/parallel.py`` for the whole scheme):
the layout/options ``all_gather``; ``all_reduce(MAX)`` of the row maxima of teacher / T and
student / T (+ the student at T = 1 when ce_weight > 0): 2-3 R floats; ``all_reduce(SUM)`` of the
rescaled sums (+ the owner's label logit): 2-4 R floats; ``all_reduce(SUM)`` of the shard's
divergence terms in float64 (1 R for kl / reverse_kl, 3 R for jsd).

Memory: the shard goes through the single-device streaming forward kernel (its per-row stats and
the divergence of the shard-normalised distributions, which kl and reverse_kl split exactly into
the global one: ``distill_combine``) and the single-device backward kernel fed the global stats:
O(R) beside the gradient. jsd's terms need the global normalisation before they exist: a torch
pass over row blocks of ``TERMS_BLOCK`` logits (its temporaries: one block). On the torch path
(no Triton: plain CPU, float64) the torch twins of the kernels run on the whole shard, as the
single-device torch path does.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.exchange import IGNORED, VocabShard, exchange_device, localize_target, vocab_shard
from ..core.formulas_torch import transform_grad, transform_logits
from ..core.inputs import class_ids, target_range_check
from ..core.op_schema import input_grads
from ..core.options import REDUCTIONS
from ..core.row_blocks import BLOCK_ELEMS
from ..core.runtime import alloc, compute_dtype, is_compiling, no_second_derivative
from . import rows_torch
from .ops import both_triton, distill_backward_into, distill_forward_rows, logprobs_forward_rows
from .options import DIVERGENCES, KLOptions
from .parallel import check_shard_logits, localize, owner_gather
from .rows_torch import JSD, KL, REVERSE_KL, mixture_excess, mixture_gaps

TERMS_BLOCK = BLOCK_ELEMS  # logits per row block of the jsd terms' torch pass (its temporaries)


def kernel_opts(divergence: int, beta: float, temperature: float, ignore_index: int, ce_weight: float,
                softcap: float) -> KLOptions:
    """The single-device launchers' ``KLOptions`` of a shard's scalars (softcap 0.0: none; being
    elementwise, each shard caps its own logits with the same kernels)."""
    return KLOptions(divergence=DIVERGENCES[divergence], beta=beta, temperature=temperature,
                     ignore_index=ignore_index, ce_weight=ce_weight, softcap=softcap)


def distill_local(x2: Tensor, t2: Tensor, loc: Optional[Tensor], divergence: int, beta: float,
                  temperature: float, use_ce: bool, softcap: float = 0.0) -> Tensor:
    """Per row of a shard (R, 8) in the compute dtype: (ref_p, log s_p, ref_q, log s_q, ref_1,
    log s_1, inner, x_y) over THIS shard's classes, by the single-device streaming forward
    (``distill_forward_rows`` without labels: the kernel's per-row stats, or its torch twin) and,
    for the CE at T != 1, ``logprobs_forward_rows`` at T = 1. ``inner``: the divergence of the
    shard-normalised distributions (kl) / their W (reverse_kl); 0 for jsd (its terms need the
    global normalisation: ``jsd_terms``). x_y: the owned label's logit (0 elsewhere)."""
    R, C = x2.shape
    cdt = compute_dtype(x2)
    out = torch.zeros((R, 8), dtype=cdt, device=x2.device)
    if C == 0:  # no class here: every log s = -inf, the shard adds nothing
        out[:, [1, 3, 5]] = float("-inf")
        return out
    # jsd: the kl kernel (one pass) for the stats alone
    div, st = distill_forward_rows(x2, t2, None, kernel_opts(KL if divergence == JSD else divergence, beta,
                                                             temperature, -100, 0.0, softcap))
    out[:, :4] = st[:, :4].to(cdt)
    if divergence == KL:
        out[:, 6] = div.to(cdt)
    elif divergence == REVERSE_KL:
        out[:, 6] = st[:, 6].to(cdt)
    if use_ce:
        if temperature == 1.0:  # x / T = x: the student's own stats
            out[:, 4:6] = out[:, 2:4]
        else:
            safe = torch.where(loc >= 0, loc, torch.zeros_like(loc))
            out[:, 4:6] = logprobs_forward_rows(x2, safe, KLOptions(softcap=softcap))[2].to(cdt)
        out[:, 7] = transform_logits(owner_gather(x2, loc).to(cdt), 1.0, softcap)
    return out


def jsd_terms(x2: Tensor, t2: Tensor, stats: Tensor, beta: float, temperature: float,
              softcap: float = 0.0) -> Tensor:
    """(R, 3) float64: this shard's sum p (log p - log m), sum q (log q - log m) and H = sum q h
    under the GLOBAL (ref, log S) of ``stats`` (columns 0-3), by torch ops on row blocks of about
    ``TERMS_BLOCK`` logits (temporaries of one block, not R x C_local)."""
    R, C = x2.shape
    out = torch.zeros((R, 3), dtype=torch.float64, device=x2.device)
    if C == 0:
        return out
    cdt = stats.dtype
    step = max(1, TERMS_BLOCK // C)
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        st = stats[r0:r1]
        a = transform_logits(t2[r0:r1].to(cdt), 1.0, softcap) / temperature
        b = transform_logits(x2[r0:r1].to(cdt), 1.0, softcap) / temperature
        logp = rows_torch.log_softmax_from(a, st[:, 0], st[:, 1])
        logq = rows_torch.log_softmax_from(b, st[:, 2], st[:, 3])
        p, q = torch.exp(logp), torch.exp(logq)
        zero = torch.zeros_like(p)
        gap_p, gap_q = mixture_gaps(logp, logq, beta)
        out[r0:r1, 0] = torch.where(p > 0, p * gap_p, zero).sum(-1, dtype=torch.float64)
        out[r0:r1, 1] = torch.where(q > 0, q * gap_q, zero).sum(-1, dtype=torch.float64)
        h = mixture_excess(logp, logq, beta)
        out[r0:r1, 2] = torch.where(q > 0, q * h, zero).sum(-1, dtype=torch.float64)
    return out


def distill_combine(local: Tensor, loc: Optional[Tensor], labels: Optional[Tensor], group: Any,
                    divergence: int, beta: float, ignore_index: int, ce_weight: float, use_ce: bool,
                    terms: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """(per-row loss, stats (R, 8)) of the full vocabulary from every shard's ``distill_local``:
    ``all_reduce(MAX)`` of the references (2-3 R), ``all_reduce(SUM)`` of the rescaled sums (+ the
    owner's label logit: 2-4 R), ``all_reduce(SUM)`` of the shard's divergence terms in float64
    (1 R; 3 R for jsd, ``terms(partial stats)``). With the shard weights
    w_p = e^{ref_p,r + log s_p,r - ref_p - log S_p} (and w_q), the global divergences are
    kl = sum_r w_p (kl_r + log w_p - log w_q), W = sum_r w_q (W_r + (ref_q,r - ref_q) -
    (ref_p,r - ref_p)) (D = W + log S_p - log S_q): exactly the single-device formulas, split."""
    R, cdt = local.shape[0], local.dtype
    k = 3 if use_ce else 2
    ref_l, log_s_l = local[:, [0, 2, 4][:k]].t(), local[:, [1, 3, 5][:k]].t()
    live = log_s_l > float("-inf")
    m = torch.where(live, ref_l, torch.full_like(ref_l, float("-inf")))
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    ref = rows_torch.safe_ref(m)
    sums = [torch.where(live, torch.exp(ref_l - ref + log_s_l), torch.zeros_like(ref_l))]
    if use_ce:
        sums.append(torch.where(loc >= 0, local[:, 7] - ref[2], torch.zeros_like(ref[2]))[None])
    pack = torch.cat(sums)
    dist.all_reduce(pack, op=dist.ReduceOp.SUM, group=group)
    log_s = torch.log(pack[:k])
    f64 = torch.float64
    lw = ((ref_l - ref) + (log_s_l - log_s)).to(f64)  # log of each shard's mass in p, q (and x)
    w = torch.exp(lw)
    inner = local[:, 6].to(f64)
    if divergence == KL:
        div_sums = torch.where(live[0], w[0] * (inner + lw[0] - lw[1]), torch.zeros_like(inner))[None]
    elif divergence == REVERSE_KL:
        moved = inner + (ref_l[1] - ref[1]).to(f64) - (ref_l[0] - ref[0]).to(f64)
        div_sums = torch.where(live[1], w[1] * moved, torch.zeros_like(inner))[None]
    else:
        partial = torch.stack([ref[0], log_s[0], ref[1], log_s[1]], dim=1)
        div_sums = terms(partial).t().contiguous()
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
    ok = torch.ones(R, dtype=torch.bool, device=local.device) if labels is None else labels != ignore_index
    loss = div
    ref_1, log_s1 = (ref[2], log_s[2]) if use_ce else (torch.zeros_like(extra), torch.zeros_like(extra))
    if use_ce:
        loss = ce_weight * (log_s1 - pack[3]) + (1 - ce_weight) * div
    loss = torch.where(ok, loss, torch.zeros_like(loss))
    stats = torch.stack([ref[0], log_s[0], ref[1], log_s[1], ref_1, log_s1, extra, ok.to(cdt)], dim=1)
    return loss, stats


def distill_shard_backward_into(out: Tensor, x2: Tensor, t2: Tensor, labels: Optional[Tensor],
                                shard: VocabShard, stats: Tensor, dloss: Tensor, divergence: int,
                                beta: float, temperature: float, ignore_index: int, ce_weight: float,
                                use_ce: bool, softcap: float = 0.0) -> None:
    """dL/dx of a shard's logits x2 into ``out`` (may be x2) from the global stats: the single-device
    backward kernel with shard-local labels (``localize_target``: another shard's label never
    matches a column), or the torch twin plus the CE term (the torch path: R x C_local temporaries)."""
    R, C = x2.shape
    if R == 0 or C == 0:
        return
    if both_triton(x2, t2):
        lbl = None if labels is None else localize_target(labels, shard, ignore_index)
        distill_backward_into(out, x2, t2, lbl, stats, dloss.to(stats.dtype),
                              kernel_opts(divergence, beta, temperature, IGNORED, ce_weight, softcap))
        return
    ok = stats[:, 7] > 0
    g = torch.where(ok, dloss.to(stats.dtype), torch.zeros_like(stats[:, 7]))
    opts = kernel_opts(divergence, beta, temperature, ignore_index, ce_weight, softcap)
    dx = rows_torch.distill_backward(x2, t2, None, stats, g, opts).to(stats.dtype)
    if use_ce:  # g alpha (softmax(x)_j - [j = label]), the softmax from the global (ref_1, log s_1)
        loc = localize(labels, shard)
        xs = transform_logits(x2.to(stats.dtype), 1.0, softcap)
        sm1 = torch.exp(rows_torch.log_softmax_from(xs, stats[:, 4], stats[:, 5]))
        onehot = torch.arange(C, device=x2.device)[None, :] == loc[:, None]
        dx = dx + transform_grad((g * ce_weight)[:, None] * (sm1 - onehot.to(sm1.dtype)), xs, 1.0, softcap)
    out.copy_(dx)


class VocabParallelDistill(torch.autograd.Function):
    """forward: the shard's streaming pass + 3 all-reduces of O(R); backward: local."""

    @staticmethod
    def forward(ctx, x2: Tensor, t2: Tensor, labels: Optional[Tensor], shard: VocabShard, group: Any,
                divergence: int, beta: float, temperature: float, ignore_index: int, ce_weight: float,
                softcap: float):
        use_ce = labels is not None and ce_weight != 0
        loc = localize(labels, shard) if labels is not None else None
        local = distill_local(x2, t2, loc, divergence, beta, temperature, use_ce, softcap)
        loss, stats = distill_combine(local, loc, labels, group, divergence, beta, ignore_index, ce_weight,
                                      use_ce, lambda st: jsd_terms(x2, t2, st, beta, temperature, softcap))
        ctx.save_for_backward(x2, t2, labels, stats)
        ctx.flat = (shard, divergence, beta, temperature, ignore_index, ce_weight, use_ce, softcap)
        ctx.set_materialize_grads(False)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        x2, t2, labels, stats = ctx.saved_tensors
        shard, divergence, beta, temperature, ignore_index, ce_weight, use_ce, softcap = ctx.flat
        if dloss is None:
            return input_grads(ctx, no_second_derivative(torch.zeros_like(x2), "distillation_loss"))
        out = alloc(x2.shape, x2.dtype, x2.device)
        distill_shard_backward_into(out, x2, t2, labels, shard, stats, dloss, divergence, beta, temperature,
                                    ignore_index, ce_weight, use_ce, softcap)
        return input_grads(ctx, no_second_derivative(out, "distillation_loss"))


def vocab_parallel_distillation_rows(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor],
                                     chosen: Optional[KLOptions], process_group: Any,
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
          "labels", "softcap", "token_weight")


def distill_agreement(chosen: Optional[KLOptions], has_labels: bool, extra_agree: dict) -> dict:
    """The values every rank must share (``vocab_shard``'s ``agree``): ``chosen``'s options (zeros
    when this rank's options were invalid: its error is raised after the exchange), + extra."""
    if chosen is not None:  # the validated KLOptions (options.make_kl)
        opts = chosen
        div, beta, temperature, ce_weight = (DIVERGENCES.index(opts.divergence), opts.beta, opts.temperature,
                                             opts.ce_weight)
        values = (div, beta if div == JSD else 0.0, temperature, ce_weight,
                  float(REDUCTIONS.index(opts.reduction)), opts.ignore_index,
                  float(opts.empty_batch == "zero"), float(has_labels), opts.softcap,
                  float(opts.has_token_weight))
    else:
        values = (0.0,) * len(AGREED)
    return dict(zip(AGREED, values), **extra_agree)


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
    agree = distill_agreement(chosen, labels is not None, extra_agree)
    shard = vocab_shard(process_group, C_local, exchange_device(process_group, student_logits),
                        vocab_start_index, agree, "vocab-parallel distillation_loss", True, local_error)
    opts = chosen  # not None: vocab_shard raised its error otherwise
    assert opts is not None
    div = DIVERGENCES.index(opts.divergence)
    if lbl is not None:
        target_range_check(lbl, shard.n_classes, opts.ignore_index)
    rows = student_logits.shape[:-1].numel()
    loss_rows = VocabParallelDistill.apply(
        student_logits.reshape(rows, C_local), teacher_logits.detach().reshape(rows, C_local), lbl, shard,
        process_group, div, opts.beta, opts.temperature, opts.ignore_index, opts.ce_weight, opts.softcap)
    return loss_rows, lbl
