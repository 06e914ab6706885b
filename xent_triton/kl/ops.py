"""KL-family ops: the launchers of the distillation and log-prob kernels and the ``xent_triton::``
custom ops (fake implementations, registered autograd; one door for eager and torch.compile, as
``cross_entropy/ops.py``).

Layout: student / teacher / logits rows as (R, C) views with any strides (the class stride is
passed to the kernels), labels / tokens int64 (R,). Each launcher runs the Triton kernels when
Triton serves both tensors (CUDA, or any device under ``TRITON_INTERPRET=1``; fp16/bf16/fp32) and
the torch twins of ``kl/rows_torch.py`` otherwise (CPU, float64).

Ops: ``distillation_fwd`` -> (loss rows, stats); ``distillation_bwd`` -> dL/dstudent;
``token_logprobs_fwd`` -> (log-probs, entropy or an empty tensor, stats); ``token_logprobs_bwd``.
The teacher gets no gradient (treated as a constant).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..core import launch
from ..core.inputs import target_range_check
from ..core.op_schema import input_grads, options_op
from ..core.runtime import (
    TRITON_DTYPES,
    alloc,
    compute_dtype,
    no_second_derivative,
    upstream_or_zeros,
    uses_triton,
)
from . import rows_torch
from .distill_kernels import N_STATS, distill_bwd_kernel, distill_fwd_kernel
from .logprobs_kernels import logprobs_bwd_kernel, logprobs_fwd_kernel
from .options import DIVERGENCES, KLOptions


def both_triton(x: Tensor, t: Tensor) -> bool:
    return uses_triton(x) and t.dtype in TRITON_DTYPES


def distill_scalars(opts: KLOptions) -> dict:
    """The distillation kernels' runtime scalars and constexprs (softcap: a runtime float, its
    presence a constexpr)."""
    return dict(temperature=opts.temperature, ce_weight=opts.ce_weight, beta=opts.beta, softcap=opts.softcap,
                ignore_index=opts.ignore_index, DIVERGENCE=DIVERGENCES.index(opts.divergence),
                HAS_SOFTCAP=opts.has_softcap)


def distill_forward_rows(x: Tensor, t: Tensor, labels: Optional[Tensor],
                         opts: KLOptions) -> tuple[Tensor, Tensor]:
    """Per-row (loss, stats) of student rows x (R, C) against teacher rows t (R, C)."""
    if not both_triton(x, t):
        return rows_torch.distill_forward(x, t, labels, opts)
    R, C = x.shape
    loss = alloc((R,), torch.float32, x.device)
    stats = alloc((R, N_STATS), torch.float32, x.device)
    if R == 0:
        return loss, stats
    cfg = launch.config(C)
    distill_fwd_kernel[(R,)](
        s_ptr=x, stride_sn=x.stride(0), stride_sc=x.stride(1), t_ptr=t, stride_tn=t.stride(0),
        stride_tc=t.stride(1), lbl_ptr=labels if labels is not None else x, loss_ptr=loss,
        stats_ptr=stats, C=C, **distill_scalars(opts), HAS_LABELS=labels is not None,
        HAS_CE=labels is not None and opts.ce_weight != 0, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
        **launch.distill_forward_compile_options(opts.divergence == "jsd"),
    )
    return loss, stats


def distill_backward_into(out: Tensor, x: Tensor, t: Tensor, labels: Optional[Tensor], stats: Tensor,
                          dloss: Tensor, opts: KLOptions) -> None:
    """dL/dx of the student rows into ``out`` (may be ``x``)."""
    if not both_triton(x, t):
        out.copy_(rows_torch.distill_backward(x, t, labels, stats, dloss, opts))
        return
    R, C = x.shape
    if R == 0 or C == 0:
        return
    cfg = launch.config(C)
    grid, span = launch.backward_grid(R, C, cfg.block_c)
    distill_bwd_kernel[grid](
        s_ptr=x, stride_sn=x.stride(0), stride_sc=x.stride(1), t_ptr=t, stride_tn=t.stride(0),
        stride_tc=t.stride(1), lbl_ptr=labels if labels is not None else x, dx_ptr=out,
        stride_gn=out.stride(0), stride_gc=out.stride(1), stats_ptr=stats, dloss_ptr=dloss,
        stride_dloss=dloss.stride(0), C=C, span=span, **distill_scalars(opts), HAS_LABELS=labels is not None,
        HAS_CE=labels is not None and opts.ce_weight != 0, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )


def logprobs_forward_rows(x: Tensor, tokens: Tensor, opts: KLOptions,
                          scratch: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(log-probs (R,), entropy (R,) or (0,), stats (R, 2)) of rows x (R, C); ``scratch``: the torch
    path may overwrite x. A row whose token is ``opts.ignore_index`` gives lp 0, entropy 0, stats
    (0, 0) on both paths (the kernel reads none of its logits)."""
    if not uses_triton(x):
        return rows_torch.logprobs_forward(x, tokens, opts, scratch)
    R, C = x.shape
    entropy = opts.return_entropy
    lp = alloc((R,), torch.float32, x.device)
    ent = alloc((R if entropy else 0,), torch.float32, x.device)
    stats = alloc((R, 2), torch.float32, x.device)
    if R == 0:
        return lp, ent, stats
    cfg = launch.config(C)
    logprobs_fwd_kernel[(R,)](
        x_ptr=x, stride_xn=x.stride(0), stride_xc=x.stride(1), tok_ptr=tokens, lp_ptr=lp,
        ent_ptr=ent if entropy else lp, stats_ptr=stats, C=C, ignore_index=opts.ignore_index,
        temperature=opts.temperature, softcap=opts.softcap, ENTROPY=entropy, HAS_SOFTCAP=opts.has_softcap,
        BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )
    return lp, ent, stats


def logprobs_backward_into(out: Tensor, x: Tensor, tokens: Tensor, ent: Tensor, stats: Tensor,
                           dlp: Tensor, dent: Optional[Tensor], opts: KLOptions) -> None:
    """dL/dx of rows x into ``out`` (may be ``x``); a row whose token is ``opts.ignore_index`` gets a
    zero row (the kernel reads none of its logits)."""
    if not uses_triton(x):
        rows_torch.logprobs_backward(x, tokens, ent, stats, dlp, dent, opts, out=out)
        return
    R, C = x.shape
    if R == 0 or C == 0:
        return
    cfg = launch.config(C)
    grid, span = launch.backward_grid(R, C, cfg.block_c)
    logprobs_bwd_kernel[grid](
        x_ptr=x, stride_xn=x.stride(0), stride_xc=x.stride(1), tok_ptr=tokens,
        ent_ptr=ent if dent is not None else stats, stats_ptr=stats, dx_ptr=out, stride_gn=out.stride(0),
        stride_gc=out.stride(1), dlp_ptr=dlp, stride_dlp=dlp.stride(0),
        dent_ptr=dent if dent is not None else dlp, stride_dent=dent.stride(0) if dent is not None else 0,
        C=C, ignore_index=opts.ignore_index, span=span, temperature=opts.temperature, softcap=opts.softcap,
        HAS_DENT=dent is not None, HAS_SOFTCAP=opts.has_softcap, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )


# ------------------------------------------------------------------------------- custom ops
# Each op takes the options as keyword-only arguments, one per KLOptions field (core/op_schema.py).
@options_op("xent_triton::distillation_fwd", "Tensor student, Tensor teacher, Tensor? labels",
            "(Tensor, Tensor)", options_cls=KLOptions)
def distillation_fwd(student: Tensor, teacher: Tensor, labels: Optional[Tensor],
                     **options: Any) -> tuple[Tensor, Tensor]:
    """Per-row (loss, stats) of (R, C) student / teacher logits.
    Out-of-range labels raise IndexError here on CPU (eager and compiled alike)."""
    opts = KLOptions.from_flat(**options)
    if labels is not None:
        target_range_check(labels, student.shape[1], opts.ignore_index)
    return distill_forward_rows(student, teacher, labels, opts)


@distillation_fwd.register_fake
def _(student, teacher, labels, **options):
    R, dt = student.shape[0], compute_dtype(student)
    return student.new_empty((R,), dtype=dt), student.new_empty((R, N_STATS), dtype=dt)


@options_op("xent_triton::distillation_bwd",
            "Tensor student, Tensor teacher, Tensor? labels, Tensor stats, Tensor dloss", "Tensor",
            options_cls=KLOptions)
def distillation_bwd(student: Tensor, teacher: Tensor, labels: Optional[Tensor], stats: Tensor,
                     dloss: Tensor, **options: Any) -> Tensor:
    """dL/dstudent as a new tensor with the student's shape and dtype."""
    out = alloc(student.shape, student.dtype, student.device)
    distill_backward_into(out, student, teacher, labels, stats, dloss, KLOptions.from_flat(**options))
    return out


@distillation_bwd.register_fake
def _(student, teacher, labels, stats, dloss, **options):
    return student.new_empty(student.shape)


def distillation_rows(student: Tensor, teacher: Tensor, labels: Optional[Tensor],
                      opts: KLOptions) -> tuple[Tensor, Tensor]:
    """``distillation_fwd`` with the options object (flattened here, at the schema)."""
    return torch.ops.xent_triton.distillation_fwd(student, teacher, labels, **opts.flat())


def _distill_setup(ctx, inputs, keyword_only_inputs, output):
    student, teacher, labels = inputs
    ctx.save_for_backward(student, teacher, labels, output[1])
    ctx.opts = KLOptions.from_flat(**keyword_only_inputs)
    ctx.mark_non_differentiable(output[1])


def _distill_backward(ctx, dloss, _dstats):
    student, teacher, labels, stats = ctx.saved_tensors
    dloss = upstream_or_zeros(dloss, stats.shape[0], stats.dtype, student.device)
    dx = torch.ops.xent_triton.distillation_bwd(student, teacher, labels, stats, dloss, **ctx.opts.flat())
    return input_grads(ctx, no_second_derivative(dx, "distillation_loss"))


distillation_fwd.register_autograd(_distill_backward, setup_context=_distill_setup)


@options_op("xent_triton::token_logprobs_fwd", "Tensor logits, Tensor tokens", "(Tensor, Tensor, Tensor)",
            options_cls=KLOptions)
def token_logprobs_fwd(logits: Tensor, tokens: Tensor, **options: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(log-probs, entropy or (0,), stats) of (R, C) logits; IndexError on CPU for a token outside
    [0, C) that is not ``ignore_index`` (an ignored row: 0, 0, (0, 0))."""
    opts = KLOptions.from_flat(**options)
    target_range_check(tokens, logits.shape[1], opts.ignore_index)
    return logprobs_forward_rows(logits, tokens, opts)


@token_logprobs_fwd.register_fake
def _(logits, tokens, **options):
    R, dt = logits.shape[0], compute_dtype(logits)
    ent = R if options["return_entropy"] else 0
    return (logits.new_empty((R,), dtype=dt), logits.new_empty((ent,), dtype=dt),
            logits.new_empty((R, 2), dtype=dt))


@options_op("xent_triton::token_logprobs_bwd",
            "Tensor logits, Tensor tokens, Tensor ent, Tensor stats, Tensor dlp, Tensor? dent", "Tensor",
            options_cls=KLOptions)
def token_logprobs_bwd(logits: Tensor, tokens: Tensor, ent: Tensor, stats: Tensor, dlp: Tensor,
                       dent: Optional[Tensor], **options: Any) -> Tensor:
    """dL/dlogits as a new tensor with the logits' shape and dtype."""
    out = alloc(logits.shape, logits.dtype, logits.device)
    logprobs_backward_into(out, logits, tokens, ent, stats, dlp, dent, KLOptions.from_flat(**options))
    return out


@token_logprobs_bwd.register_fake
def _(logits, tokens, ent, stats, dlp, dent, **options):
    return logits.new_empty(logits.shape)


def token_logprobs_rows(logits: Tensor, tokens: Tensor, opts: KLOptions) -> tuple[Tensor, Tensor, Tensor]:
    """``token_logprobs_fwd`` with the options object (flattened here, at the schema)."""
    return torch.ops.xent_triton.token_logprobs_fwd(logits, tokens, **opts.flat())


def saved_entropy(ent: Tensor) -> Tensor:
    """A private copy of the returned entropy for the backward (O(N)): the caller may edit the one
    it got in place (``ent.mul_(2)``) without breaking, or changing, the backward."""
    return ent.detach().clone()


def _logprobs_setup(ctx, inputs, keyword_only_inputs, output):
    logits, tokens = inputs
    ctx.save_for_backward(logits, tokens, saved_entropy(output[1]), output[2])
    ctx.opts = KLOptions.from_flat(**keyword_only_inputs)
    # an unused output's gradient stays None (entropy logged only: no entropy term in the backward)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[2])


def _logprobs_backward(ctx, dlp, dent, _dstats):
    logits, tokens, ent, stats = ctx.saved_tensors
    dlp = upstream_or_zeros(dlp, stats.shape[0], stats.dtype, logits.device)
    dent = dent if ctx.opts.return_entropy else None
    dx = torch.ops.xent_triton.token_logprobs_bwd(logits, tokens, ent, stats, dlp, dent, **ctx.opts.flat())
    return input_grads(ctx, no_second_derivative(dx, "token_logprobs"))


token_logprobs_fwd.register_autograd(_logprobs_backward, setup_context=_logprobs_setup)
