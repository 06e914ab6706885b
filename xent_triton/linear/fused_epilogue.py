"""Launchers of the fused-epilogue GEMM family (``linear/gemm_kernels.py``).

``logits_partials`` returns the 16-bit logits chunk (R, C) and the (S, R, 5) fp32 partials that
``xent_triton.core.partials.combine`` merges; only the first ``count`` rows (a device tensor, e.g. the
compacted valid-token count) are computed and written, with no host sync. ``dx_gemm`` (dX = dZ W)
and ``dw_gemm`` (dW = dZᵀ X, + db) take the same device count as their row / reduction extent, so
ignored tokens cost no FLOPs in backward either.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
from torch import Tensor

from ..core.partials import N_PARTIALS
from ..core.runtime import alloc, interpreting
from .gemm_kernels import dw_gemm_kernel, dx_gemm_kernel, logits_gemm_kernel, shifted_dz_kernel


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    sub_n: int  # class sub-tiles of block_n folded into one partial (per-row online LSE)
    group_m: int
    num_warps: int
    num_stages: int


# sm_90 / sm_80, 16-bit operands: 64 x 256 x 64 dot tiles, 8 warps (two warpgroups of wgmma on
# sm_90), 3 stages: 20 B of partials per (row, 256 classes) = 0.08 B per logit beside the 2 B of the
# 16-bit logit. The only tile of those tried that neither spills nor stacks on sm_80 and sm_90 with
# every epilogue flag on (128 x 128, 64 x 128 and SUB_N = 2 spill 32-600 B; static report).
GEMM_16 = GemmConfig(64, 256, 64, 1, 8, 8, 3)
# sm_80 (A100): 64 x 256 spills 96 B with SHIFTED and every flag; 64 x 128 x 64 / 8 warps does not
# (partials 20 B per 128 classes: 0.16 B per logit).
GEMM_SM80 = GemmConfig(64, 128, 64, 1, 8, 8, 3)
# The interpreter runs a tile as numpy ops; small tiles keep tail tiles in every test shape, and
# SUB_N = 2 exercises the sub-tile fold (tests also run SUB_N = 1, the GPU's).
INTERPRET_GEMM = GemmConfig(32, 64, 32, 2, 2, 1, 1)
GPU_PROGRAMS_PER_SM = 1


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    """Tiles of the dX / dW GEMMs (plain tiled GEMMs, GROUP_M-swizzled grid)."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# 128 x 256 x 64, 8 warps, 3 stages: the tile of Triton's matmul tutorial for 16-bit operands on
# sm_80 / sm_90 (two warpgroups of wgmma on sm_90); 144 KiB of shared memory (sm_80: 163 KiB,
# sm_90: 227 KiB). Static report: perf/linear_specs.py "dx_gemm" / "dw_gemm".
BWD_16 = BwdConfig(128, 256, 64, 8, 8, 3)
BWD_SM80 = BwdConfig(128, 256, 64, 8, 8, 3)
# dW: 128 x 256 spills 240-330 B on both targets (the fp32 accumulator of earlier chunks is loaded
# into the epilogue beside the 128 x 256 fp32 tile); 128 x 128 x 64 / 8 warps does not.
BWD_DW = BwdConfig(128, 128, 64, 8, 8, 3)
# Rows not 16-byte aligned (C or D not a multiple of 8: no vector loads, an address per element):
# the tiles above spill 8-350 B (static report --full, layouts odd / nd); these do not.
BWD_UNALIGNED_DX = BwdConfig(128, 128, 32, 8, 8, 3)
BWD_UNALIGNED_DW = BwdConfig(64, 128, 32, 8, 8, 3)
INTERPRET_BWD = BwdConfig(32, 32, 32, 2, 1, 1)


def bwd_config_for(arch: int, kernel: str = "dx", aligned: bool = True) -> BwdConfig:
    """The GPU tiles of the dX ("dx") or dW ("dw") GEMM for compute capability ``arch``;
    ``aligned``: every operand's rows start 16-byte aligned."""
    if not aligned:
        return BWD_UNALIGNED_DW if kernel == "dw" else BWD_UNALIGNED_DX
    if kernel == "dw":
        return BWD_DW
    return BWD_16 if arch >= 90 else BWD_SM80


def bwd_config(device: Optional[torch.device] = None, kernel: str = "dx", aligned: bool = True) -> BwdConfig:
    if interpreting() or device is None or device.type != "cuda":
        return INTERPRET_BWD
    major, minor = torch.cuda.get_device_capability(device)
    return bwd_config_for(10 * major + minor, kernel, aligned)


def _aligned(*ts: Optional[Tensor]) -> bool:
    return all(t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0
               for t in ts if t is not None)


def gemm_config_for(arch: int) -> GemmConfig:
    """The GPU launch config for compute capability ``arch`` (80, 90, ...)."""
    return GEMM_16 if arch >= 90 else GEMM_SM80


def gemm_config(device: Optional[torch.device] = None) -> GemmConfig:
    if interpreting() or device is None or device.type != "cuda":
        return INTERPRET_GEMM
    major, minor = torch.cuda.get_device_capability(device)
    return gemm_config_for(10 * major + minor)


def n_class_tiles(C: int, cfg: Optional[GemmConfig] = None) -> int:
    cfg = cfg or gemm_config()
    return triton.cdiv(C, cfg.block_n * cfg.sub_n)


def _programs(x: Tensor, R: int, C: int, cfg: GemmConfig) -> int:
    """Grid size from host shapes only (the M extent is on the device): every tile of the full
    R rows, capped at the number of SMs on a GPU."""
    tiles = max(1, triton.cdiv(R, cfg.block_m) * n_class_tiles(C, cfg))
    if x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return min(tiles, sms * GPU_PROGRAMS_PER_SM)
    return tiles


def logits_partials(x: Tensor, w: Tensor, target: Tensor, count: Tensor, *,
                    bias: Optional[Tensor] = None, class_weight: Optional[Tensor] = None,
                    label_smoothing: float = 0.0, logit_scale: float = 1.0, softcap: float = 0.0,
                    ignore_index: int = -100, class_offset: int = 0,
                    config: Optional[GemmConfig] = None, num_progs: Optional[int] = None,
                    shifted: bool = False) -> tuple[Tensor, Tensor]:
    """(z, part): z (R, C) in x's 16-bit dtype = T(x wᵀ + b) (logit scale, softcap) and
    part (S, R, 5) fp32 partials (``xent_triton.core.partials`` layout) of the rows < count, a
    1-element integer device tensor (clamped to R in the kernel). Other rows are not written.
    ``shifted``: z holds T(x wᵀ + b) - ref_t instead, ref_t the (row, class tile)'s partial max
    (SUB_N = 1 only): what ``shifted_dz_`` reads."""
    if x.dtype not in (torch.bfloat16, torch.float16) or w.dtype != x.dtype:
        raise TypeError(f"logits_partials: 16-bit operands of one dtype expected, got {x.dtype}, {w.dtype}")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"logits_partials: x (R, K) and w (C, K) expected, got {tuple(x.shape)}, "
                         f"{tuple(w.shape)}")
    if count.numel() != 1 or count.dtype not in (torch.int32, torch.int64):
        raise ValueError("logits_partials: count must be a 1-element int32/int64 tensor")
    cfg = config or gemm_config(x.device)
    if shifted and cfg.sub_n != 1:
        raise ValueError("logits_partials: shifted=True needs a config with sub_n = 1")
    R, K = x.shape
    C = w.shape[0]
    z = alloc((R, C), x.dtype, x.device)
    part = alloc((n_class_tiles(C, cfg), R, N_PARTIALS), torch.float32, x.device)
    progs = num_progs or _programs(x, R, C, cfg)
    dummy = part  # never read when the flag is off
    logits_gemm_kernel[(progs,)](
        x, x.stride(0), x.stride(1), w, w.stride(0), w.stride(1),
        bias if bias is not None else dummy, class_weight if class_weight is not None else dummy,
        target, count, z, z.stride(0), z.stride(1), part, R, C, K, class_offset, ignore_index,
        float(logit_scale), float(softcap) if softcap else 1.0, progs,
        HAS_BIAS=bias is not None, HAS_WEIGHT=class_weight is not None,
        HAS_SMOOTHING=label_smoothing > 0, HAS_SOFTCAP=bool(softcap),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SUB_N=cfg.sub_n, GROUP_M=cfg.group_m,
        DOT_UPCAST=interpreting() and x.dtype == torch.bfloat16, SHIFTED=shifted,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return z, part


def shifted_dz_(z: Tensor, part: Tensor, stats: Tensor, target: Tensor, weight: Optional[Tensor],
                wsum: Optional[Tensor], label_smoothing: float, logit_scale: float, softcap: float,
                ignore_index: int, config: Optional[GemmConfig] = None) -> Tensor:
    """z (a ``shifted=True`` buffer) := dL/dx for an upstream gradient of 1 per row, in place
    (rows whose target is ignore_index: left as they are). stats: (R, 3) from ``combine``."""
    cfg = config or gemm_config(z.device)
    R, C = z.shape
    if R == 0:
        return z
    shifted_dz_kernel[(R, part.shape[0])](
        z, z.stride(0), part, stats, target, weight if weight is not None else part,
        wsum if wsum is not None else part, R, C, 0, ignore_index, float(label_smoothing),
        float(softcap) if softcap else 1.0, float(logit_scale),
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0, HAS_SOFTCAP=bool(softcap),
        BLOCK_N=cfg.block_n, num_warps=4)
    torch.autograd.graph.increment_version(z)
    return z


def _out_rne(out: Tensor) -> bool:
    """Round bf16 outputs to nearest in the kernel on the interpreter (its cast truncates)."""
    return interpreting() and out.dtype == torch.bfloat16


def _count_arg(count: Tensor, name: str) -> None:
    if count.numel() != 1 or count.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: count must be a 1-element int32/int64 tensor")


def dx_gemm(dz: Tensor, w: Tensor, count: Tensor, out: Tensor, scale: Optional[Tensor] = None,
            config: Optional[BwdConfig] = None) -> Tensor:
    """out (R, D) := scale · dz (R, C) @ w (C, D) for the rows < count (a device tensor, clamped to
    R); rows >= count := 0. fp32 accumulation, one write in out's dtype. No host sync."""
    _count_arg(count, "dx_gemm")
    cfg = config or bwd_config(dz.device, "dx", _aligned(dz, w, out))
    (R, C), D = dz.shape, w.shape[1]
    if R == 0 or D == 0:
        return out
    grid = (triton.cdiv(R, cfg.block_m) * triton.cdiv(D, cfg.block_n),)
    dx_gemm_kernel[grid](
        dz, dz.stride(0), dz.stride(1), w, w.stride(0), w.stride(1), out, out.stride(0), out.stride(1),
        count, scale if scale is not None else out, R, D, C, HAS_SCALE=scale is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        DOT_UPCAST=interpreting() and dz.dtype == torch.bfloat16, OUT_RNE=_out_rne(out),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def dw_gemm(dz: Tensor, x: Tensor, count: Tensor, out: Tensor, *, acc: Optional[Tensor] = None,
            db: Optional[Tensor] = None, scale: Optional[Tensor] = None,
            config: Optional[BwdConfig] = None) -> Tensor:
    """out (C, D) := scale · (acc + dzᵀ x) over the first count rows of dz (R, C) and x (R, D)
    (count a device tensor, clamped to R; later rows are never read). fp32 accumulation in the
    GEMM; ``acc`` an fp32 (C, D) partial sum of earlier chunks with out's strides (may be out
    itself); one write in out's dtype. ``db`` (C,) fp32 := the column sums of the same rows
    (unscaled), added to db's own values when ``acc`` is given (a later chunk). No host sync."""
    _count_arg(count, "dw_gemm")
    cfg = config or bwd_config(dz.device, "dw", _aligned(dz, x, out, acc))
    (R, C), D = dz.shape, x.shape[1]
    if acc is not None and (acc.dtype != torch.float32 or acc.stride() != out.stride()):
        raise ValueError("dw_gemm: acc must be fp32 with out's strides")
    if C == 0 or D == 0:
        return out
    grid = (triton.cdiv(C, cfg.block_m) * triton.cdiv(D, cfg.block_n),)
    dw_gemm_kernel[grid](
        dz, dz.stride(0), dz.stride(1), x, x.stride(0), x.stride(1), out, out.stride(0), out.stride(1),
        acc if acc is not None else out, db if db is not None else out, count,
        scale if scale is not None else out, C, D, R, HAS_ACC=acc is not None, HAS_DB=db is not None,
        HAS_SCALE=scale is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, DOT_UPCAST=interpreting() and dz.dtype == torch.bfloat16,
        OUT_RNE=_out_rne(out), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
