"""Fused linear cross-entropy ops: launchers, the torch path, and the custom ops (fake impls,
registered autograd; one door for eager and torch.compile):

* ``xent_triton::linear_cross_entropy_chunked`` - the default for a scalar upstream gradient
  (reduction mean / sum, no lse): token chunks on vendor GEMMs that form the gradients in forward
  (``linear/chunked.py``, 6 N D C FLOPs); backward only scales them by g / denominator.
* ``xent_triton::linear_cross_entropy_fwd`` / ``_bwd`` - per-row loss / lse / stats by the fused
  partials kernel (2 N D C, no workspace: also the no-grad / eval path), and the recompute
  backward by vocabulary splits (6 N D C more, deterministic, no atomics).

Layout: hidden states x (N, D) (any strides), classifier w (C, D) (any strides), bias b (C,)
contiguous or None, targets int64 (N,) of *global* class ids, class weights fp32 (C,) or None.

Building blocks shared with the vocabulary-parallel head (``linear/parallel.py``):

* ``forward_partials`` -> (splits, N, 5) per-row partials of this weight's classes
  (``xent_triton.core.partials``), merged by ``partials.combine`` (locally, or across vocabulary
  shards with a process group);
* ``backward_accumulate`` -> (fp32 dX, dW, db) from per-row stats (possibly global ones) with a
  ``class_offset`` for the targets and the global ``n_classes`` of the smoothing formulas.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import triton
from torch import Tensor

from ..core import launch
from ..core.compaction import kept_rows
from ..core.inputs import target_range_check
from ..core.op_schema import input_grads, options_op
from ..core.options import LossOptions
from ..core.partials import N_PARTIALS, combine
from ..core.reduction import reduce_rows
from ..core.row_blocks import softmax_entropy_argmax, transformed
from ..core.runtime import (
    alloc,
    compute_dtype,
    interpreting,
    no_second_derivative,
    upstream_or_zeros,
    uses_triton,
)
from .chunk_grads import CPU_SCRATCH_ELEMS
from .chunk_torch import partials_torch
from .chunked import (
    chunk_rows,
    chunked_loss_and_grads,
    gemm_operands,
    logits_dtype,
    logits_into,
    recompute_backward,
)
from .kernels import linear_xent_fwd_kernel


def element_bits(x: Tensor) -> int:
    return 32 if x.dtype == torch.float32 else 16


def kernel_operands(x: Tensor, w: Tensor, block_rows: int, block_cols: int):
    """(x, w, aligned): the kernels address a tile with int32 offsets from an int64 block base, so
    an operand whose in-tile offsets could pass 2**31 is made contiguous (never for real shapes);
    ``aligned`` = every row starts 16-byte aligned with a unit inner stride (cp.async-able)."""
    def fits(t: Tensor, rows: int) -> bool:
        return (rows - 1) * t.stride(0) + (t.shape[1] - 1) * t.stride(1) < 2**31

    x = x if fits(x, block_rows) else x.contiguous()
    w = w if fits(w, block_cols) else w.contiguous()
    aligned = all(t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
                  for t in (x, w))
    return x, w, aligned


# ------------------------------------------------------------------------------------- forward
def dot_upcast(x: Tensor) -> bool:
    """The CPU interpreter's tl.dot mishandles bf16 (raw bits): feed it fp32 copies there."""
    return interpreting() and x.dtype == torch.bfloat16


def forward_partials(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                     weight: Optional[Tensor], opts: LossOptions, skip_ignored: bool,
                     class_offset: int = 0) -> Tensor:
    """(splits, N, 5) partials (m, s, A, a_sum, z_y) of the logits x wᵀ + b (see the kernel).
    ``skip_ignored``: ignored rows are compacted away before the GEMM / kernel (``compaction``)
    and get what the kernel writes for a skipped row block, (-inf, 0, 0, 0, 0)."""
    idx = kept_rows(target != opts.ignore_index) if skip_ignored else None
    if idx is not None:
        kept = forward_partials(x.index_select(0, idx), w, b, target.index_select(0, idx), weight, opts,
                                False, class_offset)
        part = torch.zeros((kept.shape[0], x.shape[0], N_PARTIALS), dtype=kept.dtype, device=kept.device)
        part[..., 0] = float("-inf")
        return part.index_copy_(1, idx, kept)
    N, D = x.shape
    C = w.shape[0]
    if not uses_triton(x):
        return partials_rows(x, w, b, target, weight, opts, class_offset)
    cfg = launch.linear_config(element_bits(x), kernel_operands(x, w, 128, 128)[2], C)
    x, w, _ = kernel_operands(x, w, cfg.block_n, cfg.block_v)
    splits, per = launch.linear_forward_splits(N, C, cfg)
    part = alloc((splits, N, N_PARTIALS), torch.float32, x.device)
    if N == 0:
        return part
    linear_xent_fwd_kernel[(splits * triton.cdiv(N, cfg.block_n),)](
        x_ptr=x, stride_xn=x.stride(0), stride_xd=x.stride(1), w_ptr=w, stride_wc=w.stride(0),
        stride_wd=w.stride(1), b_ptr=b if b is not None else x, cw_ptr=weight if weight is not None else x,
        tgt_ptr=target, part_ptr=part, N=N, C=C, D=D, class_offset=class_offset,
        ignore_index=opts.ignore_index, n_splits=splits, tiles_per_split=per,
        logit_scale=opts.logit_scale, softcap=opts.softcap,
        HAS_BIAS=b is not None, HAS_WEIGHT=weight is not None, HAS_SMOOTHING=opts.has_smoothing,
        HAS_SOFTCAP=opts.has_softcap, SKIP_IGNORED=skip_ignored, BLOCK_N=cfg.block_n,
        BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        DOT_PRECISION=launch.linear_dot_precision(element_bits(x)), DOT_UPCAST=dot_upcast(x),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return part


def partials_rows(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                  weight: Optional[Tensor], opts: LossOptions, class_offset: int = 0) -> Tensor:
    """The kernel's partials (1, N, 5) in torch (one split): token chunks of logits by the vendor
    GEMM into one ``logits_dtype`` workspace (16-bit on the plain-CPU path, as the token-chunked
    head), then ``chunk_torch.partials_torch`` by row blocks in the compute dtype."""
    N, C = x.shape[0], w.shape[0]
    part = torch.empty((1, N, N_PARTIALS), dtype=compute_dtype(x), device=x.device)
    y_local = torch.where(target != opts.ignore_index, target - class_offset, -1)
    rows = chunk_rows(N, C, x)
    xg, wg, bg = gemm_operands(x, w, b)
    buf = torch.empty(min(rows, N) * C, dtype=logits_dtype(x), device=x.device)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        z = logits_into(buf[:(r1 - r0) * C].view(r1 - r0, C), xg[r0:r1], wg, bg)
        partials_torch(z, y_local[r0:r1], weight, opts, part[0, r0:r1])
    return part


def linear_forward_rows(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
                 opts: LossOptions, skip_ignored: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss, lse and the stats for backward: float32 (float64 for float64 inputs)."""
    part = forward_partials(x, w, b, target, weight, opts, skip_ignored)
    loss, lse, stats = combine(part, target, weight, w.shape[0], opts)
    cdt = compute_dtype(x)
    return loss.to(cdt), lse.to(cdt), stats


# ------------------------------------------------------------------------------------ backward
def backward_accumulate(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                        weight: Optional[Tensor], stats: Tensor, dloss: Tensor,
                        dlse: Optional[Tensor], opts: LossOptions,
                        need: tuple[bool, bool, bool], class_offset: int = 0,
                        n_classes: Optional[int] = None, weight_total: Optional[Tensor] = None,
                        chunk_size: Optional[int] = None):
    """(dX (N, D) fp32 accumulator (fp64 for fp64), dW (C, D) in w's dtype, db (C,) in b's dtype);
    None where not needed. The recompute backward by vocabulary splits (``chunked.py``): no
    atomics, deterministic, 6 N D C FLOPs on vendor GEMMs.

    For a vocabulary shard: ``weight`` holds this shard's class weights, ``stats`` the global ones,
    ``class_offset`` the shard's first class, ``n_classes`` the global C and ``weight_total`` the
    global sum of class weights (label smoothing); dX is then this shard's partial sum.
    ``chunk_size`` (None / 0: automatic) sizes the vocabulary splits (``chunked.split_cols``)."""
    cdt = compute_dtype(x)
    if weight is None:
        wsum = None
    else:
        wsum = (weight_total if weight_total is not None else weight.sum()).to(cdt).reshape(1)
    return recompute_backward(x, w, b, target, weight, stats, dloss, dlse, opts, need, class_offset,
                              n_classes, wsum, chunk_size or None)


def linear_backward_rows(x, w, b, target, weight, stats, dloss, dlse, opts: LossOptions,
                  need: tuple[bool, bool, bool], chunk_size: int = 0):
    """(dX, dW, db) in the dtypes of x, w, b (None where not needed)."""
    dx, dw, db = backward_accumulate(x, w, b, target, weight, stats, dloss, dlse, opts, need,
                                     chunk_size=chunk_size)
    return (dx.to(x.dtype) if dx is not None else None, dw.to(w.dtype) if dw is not None else None,
            db.to(b.dtype) if db is not None else None)


# ---------------------------------------------------------------------------------- custom ops
# Each op takes the options as keyword-only arguments, one per LossOptions field (core/op_schema.py).
HEAD_ARGS = "Tensor x, Tensor w, Tensor? b, Tensor target, Tensor? weight"


@options_op("xent_triton::linear_cross_entropy_fwd", f"{HEAD_ARGS}, bool skip_ignored, SymInt chunk_size",
            "(Tensor, Tensor, Tensor)")
def linear_cross_entropy_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                             weight: Optional[Tensor], skip_ignored: bool, chunk_size: int,
                             **options: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, stats); out-of-range class ids raise IndexError here on CPU.
    ``chunk_size`` (0: automatic) is kept for the backward's vocabulary splits."""
    opts = LossOptions.from_flat(**options)
    target_range_check(target, w.shape[0], opts.ignore_index)
    return linear_forward_rows(x, w, b, target, weight, opts, skip_ignored)


@linear_cross_entropy_fwd.register_fake
def _(x, w, b, target, weight, skip_ignored, chunk_size, **options):
    N = x.shape[0]
    dt = compute_dtype(x)
    return x.new_empty((N,), dtype=dt), x.new_empty((N,), dtype=dt), x.new_empty((N, 3), dtype=dt)


@options_op("xent_triton::linear_cross_entropy_bwd",
            f"{HEAD_ARGS}, Tensor stats, Tensor dloss, Tensor? dlse, bool need_dx, bool need_dw, "
            "bool need_db, SymInt chunk_size", "(Tensor, Tensor, Tensor)")
def linear_cross_entropy_bwd(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                             weight: Optional[Tensor], stats: Tensor, dloss: Tensor,
                             dlse: Optional[Tensor], need_dx: bool, need_dw: bool, need_db: bool,
                             chunk_size: int, **options: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dW, db); a gradient that is not needed comes back as an empty (0,) tensor."""
    opts = LossOptions.from_flat(**options)
    need = (need_dx, need_dw, need_db)
    grads = linear_backward_rows(x, w, b, target, weight, stats, dloss, dlse, opts, need, chunk_size)
    return tuple(g if g is not None else x.new_empty((0,)) for g in grads)


@linear_cross_entropy_bwd.register_fake
def _(x, w, b, target, weight, stats, dloss, dlse, need_dx, need_dw, need_db, chunk_size, **options):
    return (x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
            w.new_empty(w.shape) if need_dw else x.new_empty((0,)),
            b.new_empty(b.shape) if need_db else x.new_empty((0,)))


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    x, w, b, target, weight, _skip, chunk_size = inputs
    ctx.save_for_backward(x, w, b, target, weight, output[2])
    ctx.opts = LossOptions.from_flat(**keyword_only_inputs)
    ctx.chunk_size = chunk_size
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # an unused lse must not read as a zero gradient


def _backward(ctx, dloss, dlse, _dstats):
    x, w, b, target, weight, stats = ctx.saved_tensors
    dloss = upstream_or_zeros(dloss, stats.shape[0], stats.dtype, x.device)
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
    grads = torch.ops.xent_triton.linear_cross_entropy_bwd(x, w, b, target, weight, stats, dloss, dlse, *need,
                                                           ctx.chunk_size, **ctx.opts.flat())
    return input_grads(ctx, *(no_second_derivative(g, "linear_cross_entropy") if n else None
                              for g, n in zip(grads, need)))


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy_rows(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                              weight: Optional[Tensor], opts: LossOptions,
                              skip_ignored: bool, chunk_size: Optional[int] = None
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """(loss_rows, lse, stats) with autograd, through ``xent_triton::linear_cross_entropy_fwd``;
    ``chunk_size`` sizes the vocabulary splits of its backward."""
    return torch.ops.xent_triton.linear_cross_entropy_fwd(x, w, b, target, weight, skip_ignored,
                                                          int(chunk_size or 0), **opts.flat())


# ------------------------------------------------------------------ token-chunked custom op
@options_op("xent_triton::linear_cross_entropy_chunked",
            f"{HEAD_ARGS}, Tensor? token_weight, SymInt chunk_size, bool accum_fp32, bool need_dx, "
            "bool need_dw, bool need_db, bool with_stats",
            "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def linear_cross_entropy_chunked(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                                 weight: Optional[Tensor], token_weight: Optional[Tensor], chunk_size: int,
                                 accum_fp32: bool, need_dx: bool, need_dw: bool, need_db: bool,
                                 with_stats: bool, **options: Any
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss 0-d, scale 0-d, dX, dW, db, entropy, predicted) of the token-chunked head (reduction
    mean / sum): the reduced loss (fp32), the scale 1/denominator of a mean (1 for a sum), the
    gradients for an upstream gradient of 1 before that scale (an empty (0,) tensor where not
    needed), and with ``with_stats`` the per-row entropy (N,) and argmax (N,) int64 (else empty).
    ``token_weight`` (N,) scales each row's loss and gradients. ``chunk_size`` 0 = automatic."""
    opts = LossOptions.from_flat(**options)
    target_range_check(target, w.shape[0], opts.ignore_index)
    loss_rows, lse, stats, scale, dx, dw, db, ent, pred = chunked_loss_and_grads(
        x, w, b, target, weight, opts, chunk_size if chunk_size > 0 else None, accum_fp32,
        (need_dx, need_dw, need_db), token_weight, with_stats)
    loss = reduce_rows(loss_rows, lse, stats, target, opts, lambda r: r, token_weight)
    if not with_stats:
        ent, pred = x.new_empty((0,), dtype=loss.dtype), x.new_empty((0,), dtype=torch.int64)
    return (loss, scale, *(g if g is not None else x.new_empty((0,)) for g in (dx, dw, db)), ent, pred)


@linear_cross_entropy_chunked.register_fake
def _(x, w, b, target, weight, token_weight, chunk_size, accum_fp32, need_dx, need_dw, need_db, with_stats,
      **options):
    cdt = compute_dtype(x)
    n = x.shape[0] if with_stats else 0
    return (x.new_empty((), dtype=cdt), x.new_empty((), dtype=cdt),
            x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
            w.new_empty(w.shape) if need_dw else x.new_empty((0,)),
            x.new_empty((w.shape[0],), dtype=cdt) if need_db else x.new_empty((0,)),
            x.new_empty((n,), dtype=cdt), x.new_empty((n,), dtype=torch.int64))


def _chunked_setup(ctx, inputs, keyword_only_inputs, output):
    _, scale, dx, dw, db = output[:5]
    x, w, b, _target, _weight, _tw, _chunk, _accum, need_dx, need_dw, need_db, _stats = inputs
    ctx.save_for_backward(scale, dx, dw, db)
    ctx.dtypes = (x.dtype, w.dtype, b.dtype if b is not None else None)
    ctx.need = (need_dx, need_dw, need_db)
    # dX, dW, db stay differentiable outputs (never read by a user) so that, saved, they link a
    # backward with create_graph=True to x, w, b: the raising node of a second derivative sits on
    # that path (otherwise the gradient, formed in forward, is a constant and its derivative a
    # silent zero). Unused, they cost nothing: grads are not materialised, so autograd allocates no
    # zero "gradients" of dX, dW, db.
    ctx.mark_non_differentiable(scale, *output[5:])
    ctx.set_materialize_grads(False)


def scaled(t: Tensor, s: Tensor, dtype: torch.dtype) -> Tensor:
    """t x s (0-d) in ``dtype``, one pass: IN PLACE when ``t`` is already in ``dtype`` (the saved
    dX / dW: no second (C, D) buffer; its version counter then makes a second backward through a
    retained graph raise, as autograd does for any saved tensor modified in place), except while
    torch.compile traces (functional there); else a new tensor, on CPU by row blocks (a mixed-dtype
    op there upcasts into a temporary as large as its output)."""
    if t.dtype == dtype and not torch.compiler.is_compiling():
        return t.mul_(s)
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    if t.is_cuda or t.dtype == dtype or t.dim() != 2:
        return torch.mul(t, s, out=out)
    step = max(1, CPU_SCRATCH_ELEMS // max(1, t.shape[1]))
    for r0 in range(0, t.shape[0], step):
        torch.mul(t[r0:r0 + step], s, out=out[r0:r0 + step])
    return out


def _chunked_backward(ctx, g, *_):
    """dX, dW, db = saved x g / denominator (device scalar: no host sync), in the leaves' dtypes."""
    if g is None:  # (grads are not materialised) the loss took no gradient
        return input_grads(ctx)
    scale, dx, dw, db = ctx.saved_tensors
    s = g.to(scale.dtype) * scale
    grads = []
    for t, dt, n in zip((dx, dw, db), ctx.dtypes, ctx.need):
        if not n:
            grads.append(None)
            continue
        with torch.no_grad():  # detached: scaled in place (shared version counter), no graph
            value = scaled(t.detach(), s, dt)
        grads.append(no_second_derivative(value, "linear_cross_entropy", anchor=t))
    del dx, dw, db
    return input_grads(ctx, *grads)  # token_weight: no gradient on this path (functional routes it)


linear_cross_entropy_chunked.register_autograd(_chunked_backward, setup_context=_chunked_setup)


def linear_cross_entropy_scalar(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                                weight: Optional[Tensor], opts: LossOptions, chunk_size: Optional[int],
                                accum_fp32: bool, need: tuple[bool, bool, bool],
                                token_weight: Optional[Tensor] = None,
                                with_stats: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(reduced mean / sum loss with autograd, entropy (N,), argmax (N,)) through
    ``xent_triton::linear_cross_entropy_chunked``; entropy / argmax empty unless ``with_stats``."""
    out = torch.ops.xent_triton.linear_cross_entropy_chunked(
        x, w, b, target, weight, token_weight, int(chunk_size or 0), accum_fp32, *need, with_stats,
        **opts.flat())
    return out[0], out[5], out[6]


def stats_rows(x: Tensor, w: Tensor, b: Optional[Tensor], opts: LossOptions,
               chunk_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """(entropy (N,) in the compute dtype, argmax (N,) int64) of softmax(T(x wᵀ + b)) per row, by
    token chunks: one logits GEMM per chunk (2 N D C FLOPs more) into a (rows, C) fp32 workspace.
    The per-token path's ``return_stats`` (its fused partials kernel keeps no entropy / argmax)."""
    N = x.shape[0]
    C = w.shape[0]
    cdt, dev = compute_dtype(x), x.device
    ent = torch.empty((N,), dtype=cdt, device=dev)
    pred = torch.empty((N,), dtype=torch.int64, device=dev)
    rows = chunk_rows(N, C, x, chunk_size)
    xg, wg, bg = gemm_operands(x.detach(), w.detach(), b.detach() if b is not None else None)
    buf = torch.empty(rows * C, dtype=logits_dtype(x), device=dev)
    with torch.no_grad():
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            z = logits_into(buf[:(r1 - r0) * C].view(r1 - r0, C), xg[r0:r1], wg, bg).to(cdt)
            ent[r0:r1], pred[r0:r1] = softmax_entropy_argmax(transformed(z, opts))
    return ent, pred
