"""Plain-CPU GEMMs of 16-bit operands: in their own dtype where the CPU has a fast 16-bit GEMM,
else as fp32 GEMMs over cache-sized upcast blocks.

oneDNN's 16-bit GEMMs are fast only on AMX tiles (bf16: ``amx_tile``; fp16: ``amx_fp16``): there
they ran at 2-3x its fp32 ones (perf/RESULTS.md, 2026-12-01). Without AMX they are not faster
than fp32: ``python -m perf.cpu_gemm`` on an AVX512-BF16 Xeon without AMX (2026-12-06, torch 2.13,
2 threads), the three GEMMs of a 1024-row chunk at D = 512, C = 32000: bf16 0.682 s, fp16 0.403 s,
fp32 0.399 s, bf16 operands through fp32 blocks (below) 0.441 s. So there the linear head's 16-bit
GEMMs (logits, dX, dW; also the KL linear forms') run as fp32 GEMMs on upcast blocks of about
``BLOCK_ELEMS`` elements (no fp32 copy of a whole operand beyond the (rows, D) hidden states), with
one rounding of each output into its 16-bit buffer, after the fp32 accumulation a 16-bit GEMM does
inside anyway. Memory: O(rows D + BLOCK_ELEMS) fp32, nothing per class.

``XENT_CPU_GEMM=auto|16bit|fp32`` forces the choice (the tests run both on any machine).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

CPU_GEMM_ENV = "XENT_CPU_GEMM"
BLOCK_ELEMS = 1 << 20  # fp32 elements of one upcast operand block (4 MiB)
HALF = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def has_amx(dtype: torch.dtype) -> bool:
    """Whether the CPU has the AMX tiles that make oneDNN's ``dtype`` GEMMs fast (torch's own
    capability query; False where this torch lacks it)."""
    name = "_is_amx_fp16_supported" if dtype == torch.float16 else "_is_amx_tile_supported"
    query = getattr(torch.cpu, name, None)
    try:
        return bool(query()) if query is not None else False
    except (RuntimeError, AttributeError):
        return False


def fast_16bit_gemm(dtype: torch.dtype) -> bool:
    """16-bit GEMMs in their own dtype on the CPU: ``XENT_CPU_GEMM`` if set, else ``has_amx``."""
    mode = os.environ.get(CPU_GEMM_ENV, "auto")
    if mode not in ("auto", "16bit", "fp32"):
        raise ValueError(f"{CPU_GEMM_ENV}={mode!r}: expected auto, 16bit or fp32")
    return has_amx(dtype) if mode == "auto" else mode == "16bit"


def upcast_gemm(t: Tensor) -> bool:
    """A GEMM of ``t`` (a plain CPU 16-bit operand) runs in fp32 (``mm_fp32``)."""
    return t.device.type == "cpu" and t.dtype in HALF and not fast_16bit_gemm(t.dtype)


def mm_fp32(out: Tensor, a: Tensor, b: Tensor, accumulate: bool = False,
            bias: Optional[Tensor] = None) -> Tensor:
    """out (=, or += with ``accumulate``) a @ b (+ bias (N,)) for 16-bit a (M, K), b (K, N) by fp32
    GEMMs on upcast blocks; ``out`` 16-bit (one rounding per element) or fp32.

    The largest extent is blocked: K (a reduction: into one (M, N) fp32 accumulator, ``out`` itself
    when fp32), else the rows of a / out (b upcast once), else the columns of b / out (a upcast
    once); each block (and its fp32 product) at most about ``BLOCK_ELEMS`` elements. FLOPs: 2 M N K.
    Outside any autocast region (its CPU dtype would turn these GEMMs back into 16-bit ones)."""
    with torch.autocast("cpu", enabled=False):  # fp32 GEMMs, also inside an autocast region
        return blocked_mm(out, a, b, accumulate, bias)


def blocked_mm(out: Tensor, a: Tensor, b: Tensor, accumulate: bool, bias: Optional[Tensor]) -> Tensor:
    """``mm_fp32``'s blocks (outside autocast)."""
    M, K = a.shape
    N = b.shape[1]
    if K >= max(M, N):
        acc = out if out.dtype == torch.float32 and not (accumulate and bias is not None) else \
            torch.empty((M, N), dtype=torch.float32, device=out.device)
        add = accumulate and acc is out
        if K == 0 and not add:
            acc.zero_()
        step = max(1, BLOCK_ELEMS // max(1, M, N))
        for k0 in range(0, K, step):
            k1 = min(K, k0 + step)
            if k0 == 0 and not add:
                torch.mm(a[:, k0:k1].float(), b[k0:k1].float(), out=acc)
            else:
                acc.addmm_(a[:, k0:k1].float(), b[k0:k1].float())
        if bias is not None:
            acc.add_(bias.float())
        if acc is not out:
            out.add_(acc) if accumulate else out.copy_(acc)
        return out
    rows = M >= N
    whole = b.float() if rows else a.float()
    step = max(1, BLOCK_ELEMS // max(1, K, N if rows else M))  # the cut operand's block and the product's
    for s0 in range(0, M if rows else N, step):
        s = slice(s0, min(M if rows else N, s0 + step))
        part = torch.mm(a[s].float(), whole) if rows else torch.mm(whole, b[:, s].float())
        if bias is not None:
            part.add_(bias.float() if rows else bias[s].float())
        dst = out[s] if rows else out[:, s]
        dst.add_(part) if accumulate else dst.copy_(part)
    return out
