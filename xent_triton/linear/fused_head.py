"""The linear head on the fused-epilogue GEMM family: a 16-bit chunk buffer, no host sync.

Opt-in (``linear_cross_entropy_fused``, or ``linear_cross_entropy`` through ``linear/dispatch.py``;
the package default stays the vendor-GEMM head of ``chunked.py`` until the GPU script measures this
path faster on a device and shape). Per call::

    keep  = target != ignore_index ; count = keep.sum()          device values, no host sync
    order = stable argsort(~keep)                                kept rows first, in order
    Xc, yc = X[order], target[order] ; s = 1 / Σ w_y (mean)      s a device scalar
    per chunk of R rows [r0, r0 + R):  n = clamp(count - r0, 0, R)   (a device scalar)
        Z, part = logits_gemm(Xc_chunk, W)     rows < n only: 16-bit z - ref_tile + fp32 partials
        loss, stats = combine(part)            (LSE from the partials; rows >= n: ignored)
        Z -> dZ in place, 16 bits              gemm_kernels.shifted_dz_kernel (rows < n)
        dXc = s · dZ W                         dx_gemm: rows < n (rows >= n written as zeros)
        dW (+)= dZᵀ Xc ; db (+)= Σ dZ          dw_gemm: reduction over the n rows only; fp32
                                               accumulation; the last chunk writes s · dW once
                                               in w's dtype (earlier ones into an fp32 (C, D))

Every GEMM's extent is the device count: with a fraction f of the tokens ignored the FLOPs are
(1 - f) 6 N D C up to tile padding (tests/linear/test_fused_head.py counts them), with no device -> host
transfer in forward or backward. Workspace per chunk logit: 2 B (the 16-bit buffer, overwritten
by dZ) + 20 B / 256 of partials (GPU tiles); + C D 4 B for the fp32 dW of a multi-chunk call.

Options: every ``LossOptions`` field has a verdict in ``FUSED_OPTIONS`` (honoured, or refused
with a ValueError naming it); hard targets only, 16-bit operands (CUDA or the interpreter).
``reduction="none"`` returns per-row losses without a gradient. dZ is formed for an upstream
gradient of 1 per row; the mean's 1 / Σ w_y scales dX / dW in the GEMM epilogues, and backward
multiplies the saved dX / dW by the upstream gradient g in place (db: by g / Σ w_y).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..core.op_schema import input_grads
from ..core.options import LossOptions
from ..core.partials import combine
from ..core.runtime import alloc, interpreting
from .fused_epilogue import (
    BwdConfig,
    GemmConfig,
    dw_gemm,
    dx_gemm,
    gemm_config,
    logits_partials,
    shifted_dz_,
)
from .ops import scaled

DEFAULT_CHUNK_ROWS = 4096
INTERPRET_HEAD = GemmConfig(32, 64, 32, 1, 2, 1, 1)  # sub_n = 1: the shifted buffer needs it

# Every LossOptions field: True = honoured by the fused path, False = refused unless at its default.
FUSED_OPTIONS = dict(ignore_index=True, reduction=True, label_smoothing=True, lse_square_scale=False,
                     softcap=True, logit_scale=True, empty_batch=True)


def check_options(opts: LossOptions) -> None:
    """ValueError naming the first option the fused path does not support (a refused field away
    from its default, or a field this table does not know yet)."""
    default = LossOptions()
    for f in dataclasses.fields(LossOptions):
        value = getattr(opts, f.name)
        if not FUSED_OPTIONS.get(f.name, False) and value != getattr(default, f.name):
            raise ValueError(f"the fused-epilogue linear head does not support {f.name}={value!r}; "
                             "use the vendor path (XENT_LINEAR_PATH=vendor or auto)")


def head_config(device: torch.device) -> GemmConfig:
    return INTERPRET_HEAD if interpreting() else gemm_config(device)


def _inverse_denominator(target: Tensor, keep: Tensor, weight: Optional[Tensor], C: int,
                         opts: LossOptions) -> tuple[Tensor, Optional[Tensor]]:
    """(den, 1 / den or None): den = Σ w_y over the kept tokens (a device scalar; 0 -> 1 with
    empty_batch="zero"); 1 / den (0 for den = 0: zero gradients, as torch) for a mean, else None."""
    ok = keep & (target >= 0) & (target < C)
    if weight is not None:
        w_y = weight[torch.where(ok, target, torch.zeros_like(target))]
        den = torch.where(ok, w_y, torch.zeros_like(w_y)).sum()
    else:
        den = ok.sum().float()
    if opts.empty_batch == "zero":
        den = torch.where(den == 0, torch.ones_like(den), den)
    if opts.reduction != "mean":
        return den, None
    return den, torch.where(den == 0, torch.zeros_like(den), 1.0 / den).reshape(1)


def fused_loss_and_grads(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                         weight: Optional[Tensor], opts: LossOptions, chunk_rows: Optional[int] = None,
                         config: Optional[GemmConfig] = None, bwd: Optional[BwdConfig] = None,
                         need: tuple[bool, bool, bool] = (True, True, True)):
    """(loss rows (N,) fp32, den, inv_den, dX, dW, db): per-row losses, the mean's denominator
    Σ w_y and 1 / den (None unless mean), and the gradients of the reduced loss for an upstream
    gradient of 1 (dX, dW scaled by inv_den in the GEMM epilogues; db (C,) fp32 unscaled); None
    where not in ``need``. No device -> host transfer."""
    N, D = x.shape
    C = w.shape[0]
    config = config or head_config(x.device)
    need_dx, need_dw, need_db = need
    keep = target != opts.ignore_index
    count = keep.sum().reshape(1)
    den, inv = _inverse_denominator(target, keep, weight, C, opts)
    order = torch.argsort((~keep).to(torch.int8), stable=True)
    xc, yc = x.index_select(0, order), target.index_select(0, order)
    R = max(1, min(N, chunk_rows or DEFAULT_CHUNK_ROWS))
    loss_c = torch.empty(N, dtype=torch.float32, device=x.device)
    dxc = torch.empty_like(xc) if need_dx else None
    gemm_w = need_dw or need_db
    dw = alloc((C, D), w.dtype, x.device) if gemm_w else None
    acc = torch.empty(C, D, dtype=torch.float32, device=x.device) if gemm_w and N > R else None
    db = torch.zeros(C, dtype=torch.float32, device=x.device) if need_db else None
    wsum = weight.sum().reshape(1).float() if weight is not None else None
    for r0 in range(0, N, R):
        r1 = min(N, r0 + R)
        n = (count - r0).clamp(0, r1 - r0)
        z, part = logits_partials(xc[r0:r1], w, yc[r0:r1], n, bias=b, class_weight=weight,
                                  label_smoothing=opts.label_smoothing, logit_scale=opts.logit_scale,
                                  softcap=opts.softcap, ignore_index=opts.ignore_index, config=config,
                                  shifted=True)
        # rows >= n (partials and buffer unwritten) have ignored targets: combine's torch.where and
        # the dZ kernel's row mask give them loss 0 and leave their dZ unwritten; the GEMMs below
        # stop at n
        loss, _, stats = combine(part, yc[r0:r1], weight, C, opts)
        loss_c[r0:r1] = loss
        if not any(need):
            continue
        shifted_dz_(z, part, stats.contiguous(), yc[r0:r1], weight, wsum, opts.label_smoothing,
                    opts.logit_scale, opts.softcap, opts.ignore_index, config)
        del part, stats
        if need_dx:
            dx_gemm(z, w, n, dxc[r0:r1], scale=inv, config=bwd)
        if gemm_w:
            last = r1 == N
            dw_gemm(z, xc[r0:r1], n, dw if last else acc, acc=acc if r0 > 0 else None, db=db,
                    scale=inv if last else None, config=bwd)
    del acc
    if N == 0 and dw is not None:  # no chunk ran: zero gradients, as torch
        dw.zero_()
    loss_rows = torch.empty_like(loss_c).index_copy_(0, order, loss_c)
    dx = torch.empty_like(x).index_copy_(0, order, dxc) if need_dx else None
    return loss_rows, den, inv, dx, dw if need_dw else None, db


class _FusedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, target, weight, opts, chunk_rows, config, bwd):
        need = tuple(ctx.needs_input_grad[:3]) if opts.reduction != "none" else (False,) * 3
        loss_rows, den, inv, dx, dw, db = fused_loss_and_grads(x, w, b, target, weight, opts,
                                                                chunk_rows, config, bwd, need)
        ctx.save_for_backward(dx, dw, db, inv)
        ctx.dtypes = (x.dtype, w.dtype, None if b is None else b.dtype)
        if opts.reduction == "none":
            ctx.mark_non_differentiable(loss_rows)  # per-row gradients need the recompute path
            return loss_rows
        total = loss_rows.sum()
        return total / den if opts.reduction == "mean" else total

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        dx, dw, db, inv = ctx.saved_tensors
        g = g.float()
        with torch.no_grad():  # in place on the saved dX / dW (their version counters move)
            gx = None if dx is None else scaled(dx, g, ctx.dtypes[0])
            gw = None if dw is None else scaled(dw, g, ctx.dtypes[1])
            gb = None if db is None else (db * (g if inv is None else g * inv[0])).to(ctx.dtypes[2])
        return input_grads(ctx, gx, gw, gb)


def linear_cross_entropy_fused(x: Tensor, w: Tensor, target: Tensor, *, bias: Optional[Tensor] = None,
                               weight: Optional[Tensor] = None, reduction: str = "mean",
                               ignore_index: int = -100, label_smoothing: float = 0.0,
                               lse_square_scale: float = 0.0, softcap: Optional[float] = None,
                               logit_scale: float = 1.0, empty_batch: str = "nan",
                               chunk_rows: Optional[int] = None, config: Optional[GemmConfig] = None,
                               bwd_config: Optional[BwdConfig] = None) -> Tensor:
    """The linear head's loss on the fused-epilogue GEMM path (module docstring). x (N, D) and w
    (C, D) 16-bit on CUDA or under the interpreter; ``reduction="none"`` returns per-row losses
    without a gradient. Options it does not support raise ValueError naming them."""
    opts = LossOptions.make(ignore_index=ignore_index, reduction=reduction,
                            label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                            softcap=softcap, logit_scale=logit_scale, empty_batch=empty_batch)
    return fused_head(x, w, bias, target, weight, opts, chunk_rows, config, bwd_config)


def fused_head(x: Tensor, w: Tensor, bias: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
               opts: LossOptions, chunk_rows: Optional[int] = None, config: Optional[GemmConfig] = None,
               bwd_config: Optional[BwdConfig] = None) -> Tensor:
    """``linear_cross_entropy_fused`` from validated options (``linear/dispatch.py``'s door)."""
    check_options(opts)
    if x.dtype not in (torch.bfloat16, torch.float16) or w.dtype != x.dtype:
        raise TypeError(f"the fused-epilogue linear head needs 16-bit operands of one dtype, got "
                        f"{x.dtype}, {w.dtype}")
    wt = None if weight is None else weight.float().contiguous()
    b = None if bias is None else bias.contiguous()
    return _FusedHead.apply(x.contiguous(), w.contiguous(), b, target.long(), wt, opts, chunk_rows,
                            config, bwd_config)
