"""Cross-entropy ops: the launchers of the row kernels and the ``xent_triton::`` custom ops
(with fake implementations and registered autograd) that serve eager mode and torch.compile alike.

Canonical layout: logits as an (N, C, D) view (2-D input has D = 1; K-dim input flattens its
spatial dims to D), rows r = n * D + d. Hard targets are int64 (N*D,); soft targets a float
(N, C, D) view like the logits. Each launcher routes to the Triton kernels when Triton can run the
tensor (CUDA, or any device under ``TRITON_INTERPRET=1``) and to ``cross_entropy/rows_torch.py``
otherwise (CPU, float64).

Ops (one door: eager calls the same custom ops; overhead measured in docs/design.md):
``xent_triton::cross_entropy_fwd`` -> (loss, lse, stats) per row; ``cross_entropy_bwd`` -> dL/dx;
``cross_entropy_bwd_inplace`` writes dL/dx over x (``inplace_backward``; bumps x's version).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..core import formulas_torch, launch, row_blocks
from ..core.inputs import target_range_check
from ..core.op_schema import input_grads, options_op
from ..core.options import LossOptions
from ..core.runtime import (
    alloc,
    compute_dtype,
    interpreting,
    no_second_derivative,
    upstream_or_zeros,
    uses_triton,
)
from . import rows_torch
from .kernels import cross_entropy_bwd_kernel, cross_entropy_fwd_kernel


def nd_c_strides(t: Tensor) -> dict:
    """Strides of an (N, C, D) view as the kernels' keyword arguments (suffixes n, d, c)."""
    return dict(n=t.stride(0), d=t.stride(2), c=t.stride(1))


def _strides(prefix: str, t: Tensor) -> dict:
    return {f"{prefix}{k}": v for k, v in nd_c_strides(t).items()}


def side_operands(x: Tensor, target: Tensor, weight: Optional[Tensor],
                  weight_sum: Optional[Tensor] = None) -> dict:
    """Target / soft target / class-weight pointers of the row kernels (placeholders are never
    dereferenced) and the class-weight total W (a (1,) tensor)."""
    soft = target.is_floating_point()
    soft_t = target if soft else x
    if weight is None:
        wsum = x
    else:
        wsum = (weight_sum if weight_sum is not None else weight.sum(dtype=torch.float32)).reshape(1)
    return dict(tgt_ptr=x if soft else target, w_ptr=weight if weight is not None else x, wsum_ptr=wsum,
                soft_ptr=soft_t, **_strides("stride_t", soft_t))


def entropy_argmax_torch(x: Tensor, opts: LossOptions) -> tuple[Tensor, Tensor]:
    """Per-row entropy of softmax(z) and argmax of the (N, C, D) logits, chunked torch (the
    fallback's twin of the kernel's STATS outputs; one extra read on the CPU path)."""
    N, C, D = x.shape
    cdt = compute_dtype(x)
    ent, pred = [], []
    step = max(1, (1 << 22) // max(1, C * D))  # ~4M logits per chunk
    for r0 in range(0, N, step):
        xs = x[r0:r0 + step]
        z = formulas_torch.transform_logits(xs.to(cdt), opts.logit_scale, opts.softcap).permute(0, 2, 1)
        h, idx = row_blocks.softmax_entropy_argmax(z)
        ent.append(h.reshape(-1))
        pred.append(idx.reshape(-1))
    if not ent:
        return x.new_empty((0,), dtype=cdt), x.new_empty((0,), dtype=torch.int64)
    return torch.cat(ent), torch.cat(pred)


def forward_rows(x: Tensor, target: Tensor, weight: Optional[Tensor], opts: LossOptions,
                 with_stats: bool = False,
                 skip_ignored: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, stats, entropy, predicted) of the (N, C, D) logits ``x`` (see
    kernels.cross_entropy); entropy / predicted are empty (0,) tensors unless ``with_stats``.
    ``skip_ignored`` (no output needs an ignored row): the kernel reads no logit of one."""
    N, C, D = x.shape
    R = N * D
    if not uses_triton(x):
        dt = compute_dtype(x)
        loss, lse, stats = (t.to(dt) for t in rows_torch.forward_rows_torch(x, target, weight, opts))
        if with_stats:
            ent, pred = entropy_argmax_torch(x, opts)
        else:
            ent, pred = x.new_empty((0,), dtype=dt), x.new_empty((0,), dtype=torch.int64)
        return loss, lse, stats, ent, pred
    loss = alloc((R,), torch.float32, x.device)
    lse = alloc((R,), torch.float32, x.device)
    stats = alloc((R, 3), torch.float32, x.device)
    ent = alloc((R if with_stats else 0,), torch.float32, x.device)
    pred = torch.empty((R if with_stats else 0,), dtype=torch.int64, device=x.device)
    if R == 0:
        return loss, lse, stats, ent, pred
    cfg = launch.config(C)
    soft = target.is_floating_point()
    options = {} if interpreting() else launch.forward_compile_options(
        launch.vector_friendly(x, *((target,) if soft else ())))
    cross_entropy_fwd_kernel[(R,)](
        x_ptr=x, **_strides("stride_x", x), **side_operands(x, target, weight),
        loss_ptr=loss, lse_ptr=lse, stats_ptr=stats, ent_ptr=ent if with_stats else loss,
        pred_ptr=pred if with_stats else target, C=C, D=D, n_classes=C, **opts.kernel_scalars(),
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=opts.has_smoothing,
        SOFT_TARGET=target.is_floating_point(), HAS_SOFTCAP=opts.has_softcap, BLOCK_C=cfg.block_c,
        STATS=with_stats, SKIP_IGNORED=skip_ignored and not soft and not with_stats,
        num_warps=cfg.num_warps, **options,
    )
    return loss, lse, stats, ent, pred


def backward_into(out: Tensor, x: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                  dloss: Tensor, dlse: Optional[Tensor], opts: LossOptions,
                  n_classes: Optional[int] = None, weight_sum: Optional[Tensor] = None,
                  dtarget: Optional[Tensor] = None) -> None:
    """dL/dx of the (N, C, D) logits into ``out`` (may be ``x``). ``n_classes`` / ``weight_sum``
    override C and sum(weight) in the smoothing terms (a vocabulary shard passes the global ones).
    ``dtarget`` ((N, C, D), soft targets only): also dL/dt, written by the same pass."""
    if not uses_triton(x):
        rows_torch.backward_rows_torch(x, target, weight, stats, dloss, dlse, opts, out, n_classes,
                                       weight_sum)
        if dtarget is not None:
            soft_target_grad_torch(dtarget, x, weight, stats, dloss, opts)
        return
    N, C, D = x.shape
    if N * D == 0 or C == 0:
        return
    cfg = launch.config(C)
    h = dlse if dlse is not None else dloss
    grid, span = launch.backward_grid(N * D, C, cfg.block_c)
    soft = target.is_floating_point()
    dt = dtarget if dtarget is not None else out  # placeholder pointer, never dereferenced
    options = {} if interpreting() else launch.backward_compile_options(
        launch.vector_friendly(x, out, *((target,) if soft else ())))
    cross_entropy_bwd_kernel[grid](
        x_ptr=x, **_strides("stride_x", x), dx_ptr=out, **_strides("stride_g", out),
        **side_operands(x, target, weight, weight_sum), stats_ptr=stats,
        dloss_ptr=dloss, stride_dloss=dloss.stride(0), dlse_ptr=h, stride_dlse=h.stride(0),
        dt_ptr=dt, **_strides("stride_dt", dt),
        C=C, D=D, n_classes=C if n_classes is None else n_classes, span=span, **opts.kernel_scalars(),
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=opts.has_smoothing, SOFT_TARGET=soft,
        HAS_SOFTCAP=opts.has_softcap, HAS_DLSE=dlse is not None, BLOCK_C=cfg.block_c,
        SOFT_GRAD=dtarget is not None, num_warps=cfg.num_warps, **options,
    )


def soft_target_grad_torch(dtarget: Tensor, x: Tensor, weight: Optional[Tensor], stats: Tensor,
                           dloss: Tensor, opts: LossOptions) -> None:
    """dL/dt_j = g (1 - eps) w_j (lse - z_j) into ``dtarget`` (N, C, D), chunked torch."""
    N, C, D = x.shape
    cdt = compute_dtype(x)
    ref, log_s = stats[:, 0].to(cdt), stats[:, 1].to(cdt)
    g = dloss.to(cdt)
    for c0 in range(0, C, row_blocks.CHUNK_C):
        c1 = min(C, c0 + row_blocks.CHUNK_C)
        z = formulas_torch.transform_logits(row_blocks.rows(x, c0, c1, cdt), opts.logit_scale, opts.softcap)
        dt = formulas_torch.soft_target_grad(g, z, ref, log_s, opts.label_smoothing)
        if weight is not None:
            dt = dt * weight[c0:c1].to(cdt)[None, :]
        dtarget[:, c0:c1, :].copy_(dt.view(N, D, c1 - c0).permute(0, 2, 1))


# ------------------------------------------------------------------------------- custom ops
# Each op takes the options as keyword-only arguments, one per LossOptions field (core/op_schema.py).
ROWS_RETURNS = "(Tensor, Tensor, Tensor, Tensor, Tensor)"
BWD_ARGS = "Tensor x, Tensor target, Tensor? weight, Tensor stats, Tensor dloss, Tensor? dlse"


@options_op("xent_triton::cross_entropy_fwd",
            "Tensor x, Tensor target, Tensor? weight, bool inplace_backward, bool with_stats, "
            "bool skip_ignored",
            ROWS_RETURNS)
def cross_entropy_fwd(x: Tensor, target: Tensor, weight: Optional[Tensor], inplace_backward: bool,
                      with_stats: bool, skip_ignored: bool,
                      **options: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, stats, entropy, predicted) of the (N, C, D) logits;
    ``inplace_backward`` is kept for the backward. Out-of-range class ids raise IndexError here on
    CPU (eager and compiled alike)."""
    opts = LossOptions.from_flat(**options)
    if not target.is_floating_point():
        target_range_check(target, x.shape[1], opts.ignore_index)
    return forward_rows(x, target, weight, opts, with_stats, skip_ignored)


@cross_entropy_fwd.register_fake
def _(x, target, weight, inplace_backward, with_stats, skip_ignored, **options):
    R = x.shape[0] * x.shape[2]
    dt = compute_dtype(x)
    k = R if with_stats else 0
    return (x.new_empty((R,), dtype=dt), x.new_empty((R,), dtype=dt), x.new_empty((R, 3), dtype=dt),
            x.new_empty((k,), dtype=dt), x.new_empty((k,), dtype=torch.int64))


@options_op("xent_triton::cross_entropy_bwd", BWD_ARGS, "Tensor")
def cross_entropy_bwd(x: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                      dloss: Tensor, dlse: Optional[Tensor], **options: Any) -> Tensor:
    """dL/dx as a new tensor with x's shape and dtype."""
    out = alloc(x.shape, x.dtype, x.device)
    backward_into(out, x, target, weight, stats, dloss, dlse, LossOptions.from_flat(**options))
    return out


@cross_entropy_bwd.register_fake
def _(x, target, weight, stats, dloss, dlse, **options):
    return x.new_empty(x.shape)


@options_op("xent_triton::cross_entropy_bwd_soft", BWD_ARGS, "(Tensor, Tensor)")
def cross_entropy_bwd_soft(x: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                           dloss: Tensor, dlse: Optional[Tensor], **options: Any) -> tuple[Tensor, Tensor]:
    """(dL/dx, dL/dtarget) for a probability target that requires grad, from one pass."""
    out = alloc(x.shape, x.dtype, x.device)
    dt = alloc(target.shape, target.dtype, target.device)
    backward_into(out, x, target, weight, stats, dloss, dlse, LossOptions.from_flat(**options), dtarget=dt)
    return out, dt


@cross_entropy_bwd_soft.register_fake
def _(x, target, weight, stats, dloss, dlse, **options):
    return x.new_empty(x.shape), target.new_empty(target.shape)


@options_op("xent_triton::cross_entropy_bwd_inplace", BWD_ARGS.replace("Tensor x", "Tensor(a!) x"), "()",
            mutates_args=("x",))
def cross_entropy_bwd_inplace(x: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                              dloss: Tensor, dlse: Optional[Tensor], **options: Any) -> None:
    """dL/dx written over x itself (x is consumed; its version counter is bumped)."""
    backward_into(x, x, target, weight, stats, dloss, dlse, LossOptions.from_flat(**options))


@cross_entropy_bwd_inplace.register_fake
def _(x, target, weight, stats, dloss, dlse, **options):
    return None


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    x, target, weight, inplace_backward = inputs[:4]
    ctx.save_for_backward(x, target, weight, output[2])
    ctx.opts = LossOptions.from_flat(**keyword_only_inputs)
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)  # an unused lse must not read as a zero gradient (extra bytes)


def _backward(ctx, dloss, dlse, _dstats, _dent, _dpred):
    x, target, weight, stats = ctx.saved_tensors
    dloss = upstream_or_zeros(dloss, stats.shape[0], stats.dtype, x.device)
    flat = ctx.opts.flat()
    if target.is_floating_point() and ctx.needs_input_grad[1]:
        dx, dt = torch.ops.xent_triton.cross_entropy_bwd_soft(x, target, weight, stats, dloss, dlse, **flat)
        return input_grads(ctx, no_second_derivative(dx, "cross_entropy"),
                           no_second_derivative(dt, "cross_entropy"))
    if ctx.inplace_backward:
        torch.ops.xent_triton.cross_entropy_bwd_inplace(x, target, weight, stats, dloss, dlse, **flat)
        dx = x
    else:
        dx = torch.ops.xent_triton.cross_entropy_bwd(x, target, weight, stats, dloss, dlse, **flat)
    return input_grads(ctx, no_second_derivative(dx, "cross_entropy"))


cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy_rows(x: Tensor, target: Tensor, weight: Optional[Tensor], opts: LossOptions,
                       inplace_backward: bool = False, with_stats: bool = False,
                       skip_ignored: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss_rows, lse, stats, entropy, predicted) with autograd, through the
    ``xent_triton::cross_entropy_fwd`` op (entropy / predicted empty unless ``with_stats``;
    ``skip_ignored``: ignored rows' loss / lse / stats are 0 and their logits are not read)."""
    return torch.ops.xent_triton.cross_entropy_fwd(x, target, weight, inplace_backward, with_stats,
                                                   skip_ignored, **opts.flat())
