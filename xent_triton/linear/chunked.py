"""The linear head on vendor GEMMs: token chunks (scalar upstream gradient) and vocabulary splits
(recompute backward for a per-token upstream gradient). No atomics; deterministic.

Token chunks (``chunked_loss_and_grads``; reduction mean/sum without the lse's gradient), per
chunk of ``rows`` tokens, in ONE reused (rows, C) workspace: fp32 logits where Triton runs (the
loss sees fp32-accurate logits, as the fused kernels did) + for 16-bit operands a (rows, C) 16-bit
dZ; on the plain-CPU path ``logits_dtype`` keeps 16-bit logits and forms dZ in place::

    Z_c   = X_c Wᵀ (+ b)            GEMM  2 rows D C FLOPs, logits_dtype output
    Z_c  -> dZ_c                    linear/chunk_kernels.chunk_loss_grad_kernel (2 reads + 1 write)
    dX_c  = dZ_c W                  GEMM  straight into dX's rows
    dW   += dZ_cᵀ X_c ; db += sum   GEMM  (the first chunk writes, later ones add)

6 N D C FLOPs = 3.0 x 2NDC in all, every one in a vendor GEMM. dZ is formed for the upstream
gradient 1 and WITHOUT the mean's 1/denominator (fp16 would underflow); backward multiplies the
saved dX / dW / db by g/denominator, a device scalar (no host sync). z-loss: its gradient
2 zl lse p_j (x den / n_valid for a mean) is folded into dZ as an lse gradient. Token weights
tw_r are each row's upstream gradient in the kernel (loss and z-loss terms; den = sum tw_r w_y,
n_valid = sum of tw_r over valid rows); ``return_stats`` takes the entropy and argmax from the
kernel's pass 1 (no extra read of the chunk).

dW precision (``accum_fp32``): fp32 accumulator (C D 4 bytes, + C D 2 for a 16-bit dW in backward)
or the parameter dtype (C D 2 bytes; each chunk's contribution is rounded into a 16-bit sum).
fp32 accumulation of 16-bit products: ``torch.mm/addmm(..., out_dtype=float32)`` on CUDA (torch
>= 2.8); on older CUDA torch each chunk's product goes through a (C, D) scratch in the operands'
dtype (+ C D 2 bytes) and is added to the fp32 accumulator; on CPU through a 2 MiB scratch, one
GEMM per block of classes (the add reads it from cache; no (C, D) temporary).

Vocabulary splits (``recompute_backward``): forward = the fused partials kernel (2NDC, no
workspace); backward per split of ``cols`` classes, in one (N, cols) workspace::

    Z_s = X W_sᵀ (+ b_s) ; Z_s -> dZ_s (chunk_grad_kernel, stats + per-row g, h)
    dX += dZ_s W_s (fp32 accumulator) ; dW_s = dZ_sᵀ X, db_s = sum dZ_s  (written once)

8 N D C FLOPs = 4.0 x 2NDC. The torch twins (``chunk_torch.py``) run where Triton cannot (CPU
tensors without the interpreter, float64), with torch's vectorised ops on the same buffers.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core import launch
from ..core.compaction import kept_rows, scatter_rows, take_rows
from ..core.options import LossOptions
from ..core.reduction import guard_empty, weight_sums
from ..core.runtime import alloc, compute_dtype, uses_triton
from .chunk_grads import CPU_SCRATCH_ELEMS, HAS_OUT_DTYPE, ChunkGrads, accumulate_mm, make_scratch
from .chunk_kernels import chunk_grad_kernel, chunk_loss_grad_kernel
from .chunk_torch import grad_torch, loss_grad_torch
from .cpu_gemm import mm_fp32, upcast_gemm

GPU_WORKSPACE_BYTES = 3 << 29  # rows x C x (4 + 2) bytes: 2048 rows at C = 128256 in bf16
GPU_MIN_ROWS = 1024  # below ~1024 rows (the dW GEMM's K) the GEMMs turn memory-bound
CPU_WORKSPACE_BYTES = 48 << 20  # CPU / interpreter: cache-sized chunks, memory well under torch's
CPU_MIN_ROWS = 16
ACC_BYTES = 4  # the fp32 dW accumulator of a multi-chunk head, per C x D element


def logit_bytes(x: Tensor) -> int:
    """Workspace bytes per logit of a token chunk: ``logits_dtype`` (+ a 16-bit dZ beside fp32 logits)."""
    ldt = logits_dtype(x)
    return ldt.itemsize + (x.element_size() if x.dtype != ldt else 0)


def chunk_rows(N: int, C: int, x: Tensor, chunk_size: Optional[int] = None) -> int:
    """Rows per token chunk: ``chunk_size`` if given, else the workspace budget / (C x bytes),
    at least GPU_MIN_ROWS on CUDA (CPU_MIN_ROWS elsewhere), at most N (>= 1)."""
    if chunk_size is not None:
        return max(1, min(N, int(chunk_size)))
    cuda = x.is_cuda
    budget, least = (GPU_WORKSPACE_BYTES, GPU_MIN_ROWS) if cuda else (CPU_WORKSPACE_BYTES, CPU_MIN_ROWS)
    rows = max(least, budget // max(1, C * logit_bytes(x)))
    align = 128 if cuda else 16
    rows = max(align, rows // align * align)
    return max(1, min(N, rows))


def accumulator_bytes(need_dw: bool, accum_fp32: bool, w: Tensor, x: Tensor) -> int:
    """Bytes per C x D element of the fp32 dW accumulator several token chunks would keep (and one
    chunk does without): none for a frozen head, a dW summed in the head's own dtype, or an fp32
    head (its dW is its own accumulator)."""
    return ACC_BYTES if need_dw and accum_fp32 and w.dtype != compute_dtype(x) else 0


def token_rows(n: int, C: int, D: int, x: Tensor, chunk_size: Optional[int] = None,
               acc_bytes: int = ACC_BYTES) -> int:
    """Rows per token chunk of the token-chunked head over ``n`` (kept) rows: ``chunk_rows``, or
    all n rows in ONE chunk when that workspace (n C ``logit_bytes``) is at most the chunked one
    (the budget) plus the fp32 dW accumulator a single chunk does without (C D ``acc_bytes``,
    ``accumulator_bytes``; 0 where there is none): one chunk never raises the peak.
    ``chunk_size`` still caps it. At the Llama-3 head on CUDA (bf16,
    D = 4096, C = 128256: 6 bytes per logit) that is n <= 4823 (2048 and 4096 tokens: one
    chunk; 8192: chunks of 2048 and the fp32 accumulator)."""
    rows = chunk_rows(n, C, x, chunk_size)
    if chunk_size is not None or rows >= n:
        return rows
    budget = GPU_WORKSPACE_BYTES if x.is_cuda else CPU_WORKSPACE_BYTES
    return n if n * C * logit_bytes(x) <= budget + C * D * acc_bytes else rows


def split_cols(N: int, C: int, x: Tensor, chunk_size: Optional[int] = None) -> int:
    """Classes per vocabulary split of the recompute backward: the same workspace as a token
    chunk (chunk_rows x C elements) spread over N rows, a multiple of 128 (or C)."""
    elems = chunk_rows(N, C, x, chunk_size) * C
    cols = max(128, elems // max(1, N) // 128 * 128)
    return max(1, min(C, cols))


def logits_into(out: Tensor, xr: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """out = xr wᵀ (+ b) by the vendor GEMM (K = D = 0 gives the bias / zeros, as torch); an fp32
    ``out`` of 16-bit operands by ``out_dtype`` (CUDA, torch >= 2.8); fp32 ``xr`` / ``out`` with a
    16-bit ``w`` (CPU / interpreter, ``gemm_operands``) by blocks of classes, each block of w
    upcast into a cache-sized copy (no C x D fp32 copy of w)."""
    if out.dtype == xr.dtype == w.dtype and upcast_gemm(xr):  # plain CPU without a fast 16-bit GEMM
        return mm_fp32(out, xr, w.t(), bias=b)
    if out.dtype != xr.dtype:
        torch.mm(xr, w.t(), out_dtype=out.dtype, out=out)
        return out.add_(b) if b is not None else out
    if w.dtype != xr.dtype:
        step = max(1, CPU_SCRATCH_ELEMS // max(1, w.shape[1]))
        for c0 in range(0, w.shape[0], step):
            c1 = min(w.shape[0], c0 + step)
            logits_into(out[:, c0:c1], xr, w[c0:c1].to(xr.dtype), b[c0:c1] if b is not None else None)
        return out
    if b is not None:
        return torch.addmm(b, xr, w.t(), out=out)
    return torch.mm(xr, w.t(), out=out)


def logits_dtype(x: Tensor) -> torch.dtype:
    """dtype of the logits workspace: the compute dtype where the Triton kernels read it (fp32
    logits of 16-bit operands), x's own dtype on the plain-CPU path (half the bytes; the GEMMs run
    in that dtype on AMX, else as fp32 GEMMs on upcast blocks, ``cpu_gemm``; the torch twins upcast
    cache-sized row blocks, and the loss sees the 16-bit logits torch eager's F.linear gives it)."""
    return compute_dtype(x) if uses_triton(x) else x.dtype


def gemm_operands(x: Tensor, w: Tensor, b: Optional[Tensor]):
    """(x, w, b) for ``logits_dtype(x)`` logits: 16-bit operands as they are where the GEMM
    outputs that dtype (plain CPU) or can output fp32 (CUDA, torch >= 2.8), else fp32 copies of x
    and b (N D 4 + C 4 bytes, once per call); w is copied (C D 4 bytes) only on CUDA without
    ``out_dtype`` (older torch): on the CPU (interpreter) ``logits_into`` upcasts it by blocks."""
    if logits_dtype(x) == x.dtype or (x.is_cuda and HAS_OUT_DTYPE):
        return x, w, b
    cdt = compute_dtype(x)
    return x.to(cdt), w.to(cdt) if w.is_cuda else w, b.to(cdt) if b is not None else None


# ------------------------------------------------------------------------- chunk gradient
def rows_aligned(*ts: Tensor) -> bool:
    """Rows start 16-byte aligned; else the loss kernel takes launch.FWD_UNALIGNED_MAXNREG (it
    spilled 8 bytes with every flag on, static report)."""
    return all((t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0 for t in ts)


def loss_grad_chunk(z: Tensor, dz: Tensor, target: Tensor, weight: Optional[Tensor], wsum: Optional[Tensor],
                    zcoef: Optional[Tensor], opts: LossOptions, loss: Tensor, lse: Tensor,
                    stats: Tensor, tw: Optional[Tensor] = None, ent: Optional[Tensor] = None,
                    pred: Optional[Tensor] = None) -> None:
    """dL/dx (g = 1, or the token weight ``tw`` per row) of the (rows, C) raw logits ``z``
    into ``dz`` (may be ``z``); write loss, lse, stats and (``ent`` / ``pred`` given) the entropy
    and argmax per row from the same pass."""
    rows, C = z.shape
    if rows == 0:
        return
    if not uses_triton(dz):
        return loss_grad_torch(z, dz, target, weight, wsum, zcoef, opts, loss, lse, stats, tw, ent, pred)
    cfg = launch.config(C)
    chunk_loss_grad_kernel[(rows,)](
        z_ptr=z, stride_zr=z.stride(0), dz_ptr=dz, stride_dzr=dz.stride(0), tgt_ptr=target,
        w_ptr=weight if weight is not None else z,
        wsum_ptr=wsum if wsum is not None else z, zcoef_ptr=zcoef if zcoef is not None else z,
        tw_ptr=tw if tw is not None else z,
        loss_ptr=loss, lse_ptr=lse, stats_ptr=stats, ent_ptr=ent if ent is not None else loss,
        pred_ptr=pred if pred is not None else target, C=C, n_classes=C, **opts.kernel_scalars(),
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=opts.has_smoothing, HAS_SOFTCAP=opts.has_softcap,
        HAS_ZLOSS=zcoef is not None, HAS_TOKEN_WEIGHT=tw is not None, STATS=ent is not None,
        BLOCK_C=cfg.block_c, num_warps=cfg.num_warps, **launch.forward_compile_options(rows_aligned(z, dz)))


def grad_chunk(z: Tensor, dz: Tensor, target: Tensor, weight: Optional[Tensor], wsum: Optional[Tensor],
               stats: Tensor, dloss: Tensor, dlse: Optional[Tensor], opts: LossOptions,
               class_offset: int, n_classes: int) -> None:
    """dL/dx of the (N, C_s) raw logits of a vocabulary split into ``dz`` from saved stats."""
    rows, C = z.shape
    if rows == 0:
        return
    if not uses_triton(dz):
        return grad_torch(z, dz, target, weight, wsum, stats, dloss, dlse, opts, class_offset, n_classes)
    cfg = launch.config(C)
    h = dlse if dlse is not None else dloss
    chunk_grad_kernel[(rows,)](
        z_ptr=z, stride_zr=z.stride(0), dz_ptr=dz, stride_dzr=dz.stride(0), tgt_ptr=target,
        w_ptr=weight if weight is not None else z,
        wsum_ptr=wsum if wsum is not None else z, stats_ptr=stats, dloss_ptr=dloss,
        stride_dloss=dloss.stride(0), dlse_ptr=h, stride_dlse=h.stride(0), C=C, n_classes=n_classes,
        class_offset=class_offset, **opts.kernel_scalars(), HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=opts.has_smoothing, HAS_SOFTCAP=opts.has_softcap, HAS_DLSE=dlse is not None,
        BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)


# ------------------------------------------------------------------------------ algorithms
def chunked_loss_and_grads(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                           weight: Optional[Tensor], opts: LossOptions, chunk_size: Optional[int],
                           accum_fp32: bool, need: tuple[bool, bool, bool], tw: Optional[Tensor] = None,
                           with_stats: bool = False):
    """Token-chunked forward that also forms the gradients for an upstream gradient of 1.

    Returns (loss rows, lse, stats, inv_den, dX, dW, db, ent, pred): per-row fp32 loss / lse /
    stats (N,), (N,), (N, 3); ``inv_den`` the 0-d scale of a mean (1 for a sum); dX (N, D) in x's
    dtype, dW (C, D) in w's dtype (summed in fp32 across chunks with ``accum_fp32``), db (C,) fp32;
    None if not needed. ``tw`` (N,) token weights: each row's gradient is scaled by tw_r and a mean
    divides by sum tw_r w_y (z-loss: by sum of tw_r over valid rows). ``with_stats``: entropy (N,)
    and argmax (N,) int64 per row from the same pass over each chunk (else None).

    Ignored rows are compacted away before the GEMMs (``compaction.kept_rows``; not with
    ``with_stats``, whose entropy / argmax cover them): their outputs are the kernel's constants
    for an ignored row (0; dX rows 0).
    """
    N, D = x.shape
    C = w.shape[0]
    cdt, dev = compute_dtype(x), x.device
    valid = target != opts.ignore_index
    ok = valid & (target >= 0) & (target < C)
    y_safe = torch.where(ok, target, torch.zeros_like(target))
    w_y = weight[y_safe] if weight is not None else torch.ones(N, dtype=cdt, device=dev)
    tw = tw.to(cdt).contiguous() if tw is not None else None
    den, n_valid = weight_sums(torch.where(ok, w_y, torch.zeros_like(w_y)), valid, tw)  # the reduction's
    den, n_valid = guard_empty(den, opts), guard_empty(n_valid, opts)
    mean = opts.reduction == "mean"
    zcoef = None
    if opts.lse_square_scale != 0:
        zcoef = (2 * opts.lse_square_scale) * (den / n_valid if mean else torch.ones_like(den))
        zcoef = zcoef.reshape(1)
    idx = None if with_stats else kept_rows(valid)
    xs, ts, tws = take_rows(x, idx), take_rows(target, idx), take_rows(tw, idx)
    rows = token_rows(xs.shape[0], C, D, x, chunk_size, accumulator_bytes(need[1], accum_fp32, w, x))
    loss, lse, stats, dx, dw, db, ent, pred = token_chunks(xs, w, b, ts, weight, zcoef, opts, rows,
                                                           accum_fp32, need, tws, with_stats)
    if idx is not None:
        loss, lse, stats = (scatter_rows(t, idx, N) for t in (loss, lse, stats))
        dx = scatter_rows(dx, idx, N) if dx is not None else None
    # a mean over no weight (every token ignored): NaN loss as torch, zero gradients as torch
    inv_den = torch.where(den == 0, torch.zeros_like(den), 1.0 / den) if mean else \
        torch.ones((), dtype=cdt, device=dev)
    return loss, lse, stats, inv_den, dx, dw, db, ent, pred


def token_chunks(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
                 zcoef: Optional[Tensor], opts: LossOptions, rows: int, accum_fp32: bool,
                 need: tuple[bool, bool, bool], tw: Optional[Tensor], with_stats: bool):
    """The chunk loop of ``chunked_loss_and_grads`` over all rows of ``x``: (loss, lse, stats,
    dX, dW, db, ent, pred). One chunk (rows >= N): dW = dZᵀ X is ONE GEMM (fp32 accumulation
    inside it) written in w's dtype: no accumulator. Several: an fp32 accumulator with
    ``accum_fp32`` (C D 4 bytes), rounded once into w's dtype at the end."""
    N, D = x.shape
    C = w.shape[0]
    cdt, dev = compute_dtype(x), x.device
    wsum = weight.sum().reshape(1) if weight is not None else None
    loss, lse = alloc((N,), cdt, dev), alloc((N,), cdt, dev)
    stats = alloc((N, 3), cdt, dev)
    ent = alloc((N,), cdt, dev) if with_stats else None
    pred = torch.empty((N,), dtype=torch.int64, device=dev) if with_stats else None
    grads = ChunkGrads(x, w, need, cdt if accum_fp32 and rows < N else w.dtype, cdt)
    ldt = logits_dtype(x)
    xg, wg, bg = gemm_operands(x, w, b)
    buf = torch.empty(min(rows, N) * C, dtype=ldt, device=dev)
    dbuf = buf if x.dtype == ldt else torch.empty(min(rows, N) * C, dtype=x.dtype, device=dev)  # dZ
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        z = logits_into(buf[:(r1 - r0) * C].view(r1 - r0, C), xg[r0:r1], wg, bg)
        zc = dbuf[:(r1 - r0) * C].view(r1 - r0, C)
        loss_grad_chunk(z, zc, target[r0:r1], weight, wsum, zcoef, opts, loss[r0:r1], lse[r0:r1],
                        stats[r0:r1], *(t[r0:r1] if t is not None else None for t in (tw, ent, pred)))
        grads.add(zc, x, w, r0, r1)
    del buf, dbuf
    dx, dw, db = grads.done(w)
    return loss, lse, stats, dx, dw, db, ent, pred


def recompute_backward(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor,
                       weight: Optional[Tensor], stats: Tensor, dloss: Tensor, dlse: Optional[Tensor],
                       opts: LossOptions, need: tuple[bool, bool, bool], class_offset: int = 0,
                       n_classes: Optional[int] = None, wsum: Optional[Tensor] = None,
                       chunk_size: Optional[int] = None):
    """(dX fp32 (N, D), dW (C, D) in w's dtype, db (C,) in b's dtype), None where not needed, by
    vocabulary splits (module docstring). ``weight`` = this weight's classes' class weights,
    ``wsum`` the (global) sum of class weights, ``n_classes`` the global C. Without an lse
    gradient, ignored rows (no gradient) are compacted away before the GEMMs (``compaction``)."""
    idx = kept_rows(target != opts.ignore_index) if dlse is None and any(need) else None
    if idx is not None:
        dx, dw, db = recompute_backward(take_rows(x, idx), w, b, take_rows(target, idx),
                                        weight, take_rows(stats, idx), take_rows(dloss, idx), None, opts,
                                        need, class_offset, n_classes, wsum, chunk_size)
        return (scatter_rows(dx, idx, x.shape[0]) if dx is not None else None), dw, db
    N, D = x.shape
    C = w.shape[0]
    n_classes = C if n_classes is None else n_classes
    cdt, dev = compute_dtype(x), x.device
    need_dx, need_dw, need_db = need
    dx = torch.zeros((N, D), dtype=cdt, device=dev) if need_dx else None
    dw = alloc((C, D), w.dtype, dev) if need_dw else None
    db = alloc((C,), b.dtype, dev) if need_db else None
    if N == 0 or not any(need):
        for t in (dw, db):
            if t is not None:
                t.zero_()
        return dx, dw, db
    ldt = logits_dtype(x)
    scratch = make_scratch(dx, x.dtype)
    cols = split_cols(N, C, x, chunk_size)
    xg, wg, bg = gemm_operands(x, w, b)
    buf = torch.empty(N * cols, dtype=ldt, device=dev)
    dbuf = buf if x.dtype == ldt else torch.empty(N * cols, dtype=x.dtype, device=dev)
    for c0 in range(0, C, cols):
        c1 = min(C, c0 + cols)
        ws = w[c0:c1]
        z = logits_into(buf[:N * (c1 - c0)].view(N, c1 - c0), xg, wg[c0:c1],
                          bg[c0:c1] if bg is not None else None)
        zc = dbuf[:N * (c1 - c0)].view(N, c1 - c0)
        grad_chunk(z, zc, target, weight[c0:c1] if weight is not None else None, wsum, stats, dloss, dlse,
                   opts,
                   class_offset + c0, n_classes)
        if dx is not None:
            accumulate_mm(dx, zc, ws, c0 == 0, scratch)
        if dw is not None:
            if dw.dtype == zc.dtype:
                accumulate_mm(dw[c0:c1], zc.t(), x, True, None)
            else:
                dw[c0:c1].copy_(torch.mm(zc.t(), x))
        if db is not None:
            db[c0:c1].copy_(zc.sum(0, dtype=cdt))
    return dx, dw, db


