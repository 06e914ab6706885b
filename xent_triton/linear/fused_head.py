"""The linear head on the fused-epilogue logits GEMM: a 16-bit chunk buffer, no host sync.

Opt-in (``linear_cross_entropy_fused``; the package default stays the vendor-GEMM head of
``chunked.py`` until the GPU script measures this path faster on a device and shape). Per call::

    keep  = target != ignore_index ; count = keep.sum()          device values, no host sync
    order = stable argsort(~keep)                                kept rows first, in order
    Xc, yc = X[order], target[order]
    per chunk of R rows [r0, r0 + R):  n = clamp(count - r0, 0, R)   (a device scalar)
        Z, part = logits_gemm(Xc_chunk, W)     rows < n only: 16-bit z - ref_tile + fp32 partials
        loss, stats = combine(part)            (LSE from the partials; rows >= n: ignored)
        Z -> dZ in place, 16 bits              logits_gemm.shifted_dz_kernel
        dXc = dZ W ; dW (+)= dZᵀ Xc ; db       vendor GEMMs on the chunk's R rows (host shape)

Workspace per chunk logit: 2 B (the 16-bit buffer, overwritten by dZ) + 20 B / 256 of partials
(GPU tiles). The logits GEMM skips ignored rows (device M extent); the vendor dX / dW GEMMs run
on the whole chunk (their shapes are host values; the ignored rows' dZ is 0), so with a fraction f
ignored the FLOPs are (2 (1 - f) + 4) N D C, not (1 - f) 6 N D C: a Triton GEMM with a device
extent for dX / dW is what is left to do (see the report of issue 22).

Hard targets only; mean / sum / none reductions; class weights, label smoothing, softcap and logit
scaling as the default head. dZ is formed for an upstream gradient of 1 per row in forward and the
saved dX / dW / db are scaled in backward by g / denominator (a device scalar).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.op_schema import input_grads
from ..core.options import LossOptions
from ..core.partials import combine
from ..core.runtime import interpreting
from .chunked import accumulate_mm, make_scratch
from .fused_epilogue import GemmConfig, gemm_config, logits_partials, shifted_dz_

DEFAULT_CHUNK_ROWS = 4096
INTERPRET_HEAD = GemmConfig(32, 64, 32, 1, 2, 1, 1)  # sub_n = 1: the shifted buffer needs it


def head_config(device: torch.device) -> GemmConfig:
    return INTERPRET_HEAD if interpreting() else gemm_config(device)


def fused_loss_and_grads(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                         weight: Optional[Tensor], opts: LossOptions, chunk_rows: Optional[int] = None,
                         config: Optional[GemmConfig] = None):
    """Per-row loss (N,), the sum of row weights (device scalar) and the gradients (dX, dW, db)
    of sum_r loss_r. No device -> host transfer."""
    N, D = x.shape
    C = w.shape[0]
    config = config or head_config(x.device)
    keep = target != opts.ignore_index
    count = keep.sum().reshape(1)
    order = torch.argsort((~keep).to(torch.int8), stable=True)
    xc, yc = x.index_select(0, order), target.index_select(0, order)
    R = max(1, min(N, chunk_rows or DEFAULT_CHUNK_ROWS))
    loss_c = torch.empty(N, dtype=torch.float32, device=x.device)
    roww_c = torch.empty(N, dtype=torch.float32, device=x.device)
    dxc = torch.empty_like(xc)
    multi = N > R
    dw = torch.empty(C, D, dtype=torch.float32, device=x.device) if multi else None
    scratch = make_scratch(dw, x.dtype)  # fp32 accumulation of 16-bit products (chunked.py)
    db = torch.zeros(C, dtype=torch.float32, device=x.device) if b is not None else None
    wsum = weight.sum().reshape(1).float() if weight is not None else None
    for r0 in range(0, N, R):
        r1 = min(N, r0 + R)
        n = (count - r0).clamp(0, r1 - r0)
        z, part = logits_partials(xc[r0:r1], w, yc[r0:r1], n, bias=b, class_weight=weight,
                                  label_smoothing=opts.label_smoothing, logit_scale=opts.logit_scale,
                                  softcap=opts.softcap, ignore_index=opts.ignore_index, config=config,
                                  shifted=True)
        # rows >= n (partials and buffer unwritten) have ignored targets: combine's torch.where and
        # the dZ kernel's row mask give them loss 0, row weight 0 and dZ 0 without reading them
        loss, _, stats = combine(part, yc[r0:r1], weight, C, opts)
        loss_c[r0:r1] = loss
        roww_c[r0:r1] = stats[:, 2]
        shifted_dz_(z, part, stats.contiguous(), yc[r0:r1], weight, wsum, opts.label_smoothing,
                    opts.logit_scale, opts.softcap, opts.ignore_index, config)
        torch.mm(z, w, out=dxc[r0:r1])
        if multi:
            accumulate_mm(dw, z.T, xc[r0:r1], r0 == 0, scratch)
        else:
            dw = z.T @ xc[r0:r1]
        if db is not None:
            db += z.float().sum(0)
    loss_rows = torch.empty_like(loss_c).index_copy_(0, order, loss_c)
    dx = torch.empty_like(x).index_copy_(0, order, dxc)
    return loss_rows, roww_c.sum(), dx, dw, db


class _FusedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, target, weight, opts, chunk_rows, config):
        loss_rows, den, dx, dw, db = fused_loss_and_grads(x, w, b, target, weight, opts, chunk_rows,
                                                          config)
        ctx.save_for_backward(dx, dw, db, den)
        ctx.reduction, ctx.dtypes = opts.reduction, (w.dtype, None if b is None else b.dtype)
        if opts.reduction == "none":
            ctx.mark_non_differentiable(loss_rows)  # per-row gradients need the recompute path
            return loss_rows
        total = loss_rows.sum()
        return total / den if opts.reduction == "mean" else total

    @staticmethod
    def backward(ctx, g):
        dx, dw, db, den = ctx.saved_tensors
        s = (g / den if ctx.reduction == "mean" else g).float()
        gx = (dx.float() * s).to(dx.dtype)
        gw = (dw.float() * s).to(ctx.dtypes[0])
        gb = None if db is None else (db * s).to(ctx.dtypes[1])
        return input_grads(ctx, gx, gw, gb)


def linear_cross_entropy_fused(x: Tensor, w: Tensor, target: Tensor, *, bias: Optional[Tensor] = None,
                               weight: Optional[Tensor] = None, reduction: str = "mean",
                               ignore_index: int = -100, label_smoothing: float = 0.0,
                               softcap: Optional[float] = None, logit_scale: float = 1.0,
                               chunk_rows: Optional[int] = None,
                               config: Optional[GemmConfig] = None) -> Tensor:
    """The linear head's loss on the fused-epilogue GEMM path (module docstring). x (N, D) and w
    (C, D) 16-bit on CUDA or under the interpreter; ``reduction="none"`` returns per-row losses
    without a gradient."""
    opts = LossOptions.make(ignore_index=ignore_index, reduction=reduction,
                            label_smoothing=label_smoothing, softcap=softcap, logit_scale=logit_scale)
    wt = None if weight is None else weight.float().contiguous()
    return _FusedHead.apply(x.contiguous(), w.contiguous(), bias, target.long(), wt, opts, chunk_rows,
                            config)
