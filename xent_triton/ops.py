"""torch.library custom ops around the kernels, with fake (meta) implementations and autograd.

Two doors to the same implementation (``forward_impl`` / ``backward_into``):

* eager: ``CrossEntropyFunction``, a plain ``torch.autograd.Function`` (no dispatcher round trip);
* ``torch.compile``: the ``xent_triton::`` custom ops with fake implementations and registered
  autograd, opaque shape-known nodes a compiled training step traces through with no graph break.

``cross_entropy_rows`` picks the door. Each op routes to the Triton kernels when Triton can run
the tensor (CUDA, or any device under ``TRITON_INTERPRET=1``) and to the chunked pure-torch
``reference`` otherwise (CPU, float64).

Canonical layout: logits as an (N, C, D) view (2-D input has D = 1; K-dim input flattens its
spatial dims to D), rows r = n * D + d. Hard targets are int64 (N*D,); soft targets a float
(N, C, D) view like the logits.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import reference
from .launch import backward_compile_options, backward_grid, config, interpreting, vector_friendly

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tests set this so that every output buffer starts as NaN and an unwritten element fails.
POISON_OUTPUTS = os.environ.get("XENT_POISON_OUTPUTS", "0") == "1"


def _alloc(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def uses_triton(x: Tensor) -> bool:
    """True when the kernels (not the reference) serve this tensor."""
    return x.dtype in _TRITON_DTYPES and (x.is_cuda or interpreting())


def nd_c_strides(t: Tensor) -> tuple[int, int, int]:
    """Strides of an (N, C, D) view in the kernels' argument order (n, d, c)."""
    return t.stride(0), t.stride(2), t.stride(1)


def stats_dtype(x: Tensor) -> torch.dtype:
    """Per-row outputs are float32, float64 for float64 logits (the reference path)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _side_args(x: Tensor, target: Tensor, weight: Optional[Tensor]):
    soft = target.is_floating_point()
    soft_t = target if soft else x  # placeholder pointer, never dereferenced
    tgt = x if soft else target
    w = weight if weight is not None else x
    wsum = weight.sum(dtype=torch.float32).reshape(1) if weight is not None else x
    return soft, soft_t, tgt, w, wsum


def forward_impl(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                 label_smoothing: float, lse_square_scale: float, softcap: float,
                 logit_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, stats) of the (N, C, D) logits ``x``; see kernels.cross_entropy."""
    if not uses_triton(x):
        loss, lse, stats = reference.forward_rows(x, target, weight, ignore_index, label_smoothing,
                                                  lse_square_scale, softcap, logit_scale)
        dt = stats_dtype(x)
        return loss.to(dt), lse.to(dt), stats.to(dt)
    from .kernels.cross_entropy import cross_entropy_fwd_kernel

    N, C, D = x.shape
    R = N * D
    loss = _alloc((R,), torch.float32, x.device)
    lse = _alloc((R,), torch.float32, x.device)
    stats = _alloc((R, 3), torch.float32, x.device)
    if R == 0:
        return loss, lse, stats
    soft, soft_t, tgt, w, wsum = _side_args(x, target, weight)
    cfg = config(C)
    cross_entropy_fwd_kernel[(R,)](
        x, *nd_c_strides(x), tgt, w, wsum, soft_t, *nd_c_strides(soft_t), loss, lse, stats,
        C, D, C, ignore_index, label_smoothing, lse_square_scale, softcap, logit_scale,
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0, SOFT_TARGET=soft,
        HAS_SOFTCAP=softcap > 0, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
    )
    return loss, lse, stats


@torch.library.custom_op("xent_triton::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                      label_smoothing: float, lse_square_scale: float, softcap: float,
                      logit_scale: float, inplace_backward: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Custom-op form of ``forward_impl`` (``inplace_backward`` is kept for the backward)."""
    return forward_impl(x, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap,
                        logit_scale)


@cross_entropy_fwd.register_fake
def _(x, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap, logit_scale,
      inplace_backward):
    R = x.shape[0] * x.shape[2]
    dt = stats_dtype(x)
    return x.new_empty((R,), dtype=dt), x.new_empty((R,), dtype=dt), x.new_empty((R, 3), dtype=dt)


def backward_into(out: Tensor, x: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                   dloss: Tensor, dlse: Optional[Tensor], ignore_index: int, label_smoothing: float,
                   lse_square_scale: float, softcap: float, logit_scale: float) -> None:
    if not uses_triton(x):
        reference.backward_rows(x, target, weight, stats, dloss, dlse, ignore_index, label_smoothing,
                                lse_square_scale, softcap, logit_scale, out)
        return
    from .kernels.cross_entropy import cross_entropy_bwd_kernel

    N, C, D = x.shape
    if N * D == 0 or C == 0:
        return
    soft, soft_t, tgt, w, wsum = _side_args(x, target, weight)
    cfg = config(C)
    h = dlse if dlse is not None else dloss
    grid, span = backward_grid(N * D, C, cfg.block_c)
    options = {} if interpreting() else backward_compile_options(
        vector_friendly(x, out, *((soft_t,) if soft else ())))
    cross_entropy_bwd_kernel[grid](
        x, *nd_c_strides(x), out, *nd_c_strides(out), tgt, w, wsum, soft_t, *nd_c_strides(soft_t),
        stats, dloss, dloss.stride(0), h, h.stride(0),
        C, D, C, ignore_index, span, label_smoothing, lse_square_scale, softcap, logit_scale,
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0, SOFT_TARGET=soft,
        HAS_SOFTCAP=softcap > 0, HAS_DLSE=dlse is not None, BLOCK_C=cfg.block_c,
        num_warps=cfg.num_warps, **options,
    )


@torch.library.custom_op("xent_triton::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(x: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                      dloss: Tensor, dlse: Optional[Tensor], ignore_index: int,
                      label_smoothing: float, lse_square_scale: float, softcap: float,
                      logit_scale: float) -> Tensor:
    """dL/dx as a new tensor with x's shape and dtype."""
    out = _alloc(x.shape, x.dtype, x.device)
    backward_into(out, x, target, weight, stats, dloss, dlse, ignore_index, label_smoothing,
                   lse_square_scale, softcap, logit_scale)
    return out


@cross_entropy_bwd.register_fake
def _(x, target, weight, stats, dloss, dlse, ignore_index, label_smoothing, lse_square_scale,
      softcap, logit_scale):
    return x.new_empty(x.shape)


@torch.library.custom_op("xent_triton::cross_entropy_bwd_inplace", mutates_args=("x",))
def cross_entropy_bwd_inplace(x: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                              dloss: Tensor, dlse: Optional[Tensor], ignore_index: int,
                              label_smoothing: float, lse_square_scale: float, softcap: float,
                              logit_scale: float) -> None:
    """dL/dx written over x itself (x is consumed)."""
    backward_into(x, x, target, weight, stats, dloss, dlse, ignore_index, label_smoothing,
                   lse_square_scale, softcap, logit_scale)


@cross_entropy_bwd_inplace.register_fake
def _(x, target, weight, stats, dloss, dlse, ignore_index, label_smoothing, lse_square_scale,
      softcap, logit_scale):
    return None


def _setup_context(ctx, inputs, output):
    (x, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap, logit_scale,
     inplace_backward) = inputs
    _, _, stats = output
    ctx.save_for_backward(x, target, weight, stats)
    ctx.hparams = (ignore_index, label_smoothing, lse_square_scale, softcap, logit_scale)
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(stats)


def _backward(ctx, dloss, dlse, _dstats):
    x, target, weight, stats = ctx.saved_tensors
    if dloss is None:
        dloss = torch.zeros((), dtype=stats.dtype, device=x.device).expand(stats.shape[0])
    if ctx.inplace_backward:
        torch.ops.xent_triton.cross_entropy_bwd_inplace(x, target, weight, stats, dloss, dlse, *ctx.hparams)
        dx = x
    else:
        dx = torch.ops.xent_triton.cross_entropy_bwd(x, target, weight, stats, dloss, dlse, *ctx.hparams)
    return dx, None, None, None, None, None, None, None, None


cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


class CrossEntropyFunction(torch.autograd.Function):
    """Eager autograd around ``forward_impl`` / ``backward_into`` (same math as the custom ops)."""

    @staticmethod
    def forward(ctx, x, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap,
                logit_scale, inplace_backward):
        loss, lse, stats = forward_impl(x, target, weight, ignore_index, label_smoothing,
                                        lse_square_scale, softcap, logit_scale)
        _setup_context(ctx, (x, target, weight, ignore_index, label_smoothing, lse_square_scale,
                             softcap, logit_scale, inplace_backward), (loss, lse, stats))
        ctx.set_materialize_grads(False)
        return loss, lse, stats

    @staticmethod
    def backward(ctx, dloss, dlse, _dstats):
        x, target, weight, stats = ctx.saved_tensors
        if dloss is None:
            dloss = torch.zeros((), dtype=stats.dtype, device=x.device).expand(stats.shape[0])
        out = x if ctx.inplace_backward else _alloc(x.shape, x.dtype, x.device)
        backward_into(out, x, target, weight, stats, dloss, dlse, *ctx.hparams)
        return out, None, None, None, None, None, None, None, None


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


def cross_entropy_rows(*args):
    """(loss_rows, lse, stats) with autograd: custom ops under torch.compile, else the Function."""
    if _is_compiling():
        return torch.ops.xent_triton.cross_entropy_fwd(*args)
    return CrossEntropyFunction.apply(*args)
