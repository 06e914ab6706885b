"""Launch policy: every block size and warp count the kernels use comes from here.

Reasoning (memory-bound streaming kernels, one row per program in forward, one chunk per program
in backward):

* ``BLOCK_C`` = logits per loop iteration (forward) or per program (backward). 4096 bf16 logits
  are 8 KiB per iteration: with 8 warps that is 16 logits per thread, two 16-byte vector loads,
  and 16 fp32 registers of live state, far from spilling. Larger blocks raise register pressure
  without more bandwidth; smaller blocks double the per-iteration reductions (max and sum each
  cost a cross-warp shuffle + shared-memory round trip).
* Small vocabularies (C <= 4096) use the next power of two >= C (at least ``MIN_BLOCK_C``) so
  short rows do not waste lanes; warps scale as BLOCK_C / (32 threads * 16 logits), 1..8.
* fp32 logits use the same blocks (16 KiB per iteration; 4 vector loads per thread).
* Backward grid = (rows, splits): one program per row looping over C (per-row scalars read once)
  when rows alone fill the GPU (>= ``ROWS_TO_FILL_GPU`` rows: 132 SMs x 8 resident programs x 2
  waves); with fewer rows each row is split into up to cdiv(C, BLOCK_C) spans so that about
  ``ROWS_TO_FILL_GPU`` programs run. The forward has no split (its row reduction would need a
  second combine pass); it is the smaller of the two passes (read only).

``all_configs()`` lists every configuration the launcher can return; the static resource report
and its test compile each of them for sm_80 and sm_90.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import torch
import triton

from .runtime import interpreting

MAX_BLOCK_C = 4096
MIN_BLOCK_C = 128
LOGITS_PER_THREAD = 16
THREADS_PER_WARP = 32
MAX_WARPS = 8
# Under the CPU interpreter each block is one numpy op: bigger blocks make the tests faster and
# exercise the same code (the multi-block loop is still covered, since C reaches 262144).
INTERPRET_BLOCK_C = 16384
ROWS_TO_FILL_GPU = 2048
INTERPRET_ROWS_TO_FILL = 1  # the interpreter runs programs one by one: no split (tests raise it)


@dataclasses.dataclass(frozen=True)
class Config:
    block_c: int
    num_warps: int


@dataclasses.dataclass(frozen=True)
class Overrides:
    """Launch parameters forced on every device (tests drive the multi-block / split paths with
    them; users may too). None = the policy's own choice."""
    block_c: Optional[int] = None  # logits per block of the row kernels (a power of two)
    backward_splits: Optional[int] = None  # column spans per row in the backward grid
    linear_block_v: Optional[int] = None  # class tile of the linear-head kernels
    linear_splits: Optional[int] = None  # class splits of the linear-head forward grid


_OVERRIDES = [Overrides()]


def current_overrides() -> Overrides:
    return _OVERRIDES[-1]


@contextlib.contextmanager
def overrides(**kwargs) -> Iterator[Overrides]:
    """Force launch parameters inside a ``with`` block, e.g. ``with overrides(block_c=128): ...``."""
    _OVERRIDES.append(dataclasses.replace(_OVERRIDES[-1], **kwargs))
    try:
        yield _OVERRIDES[-1]
    finally:
        _OVERRIDES.pop()


def _block_sizes():
    b = MIN_BLOCK_C
    while b <= MAX_BLOCK_C:
        yield b
        b *= 2


def _warps(block_c: int) -> int:
    return max(1, min(MAX_WARPS, block_c // (THREADS_PER_WARP * LOGITS_PER_THREAD)))


def config(C: int) -> Config:
    """Block size and warps for a row of C classes (forward and backward use the same)."""
    forced = current_overrides().block_c
    if forced is not None:
        return Config(forced, 1 if interpreting() else _warps(forced))
    if interpreting():
        return Config(min(INTERPRET_BLOCK_C, max(MIN_BLOCK_C, triton.next_power_of_2(C))), 1)
    block = min(MAX_BLOCK_C, max(MIN_BLOCK_C, triton.next_power_of_2(C)))
    return Config(block, _warps(block))


def all_configs() -> list[Config]:
    """Every configuration ``config`` can return on a GPU."""
    return [Config(b, _warps(b)) for b in _block_sizes()]


# Backward over logits the compiler cannot read with 16-byte vector loads (class stride != 1, or
# rows not 16-byte aligned, e.g. C = 50257): left alone, ptxas (sm_90 with triton's
# --regAllocOptLevel=2, and sm_80) settles on 64-80 registers and spills 4-28 bytes to the stack
# in 23 of the 3456 odd/nd-layout variants (static report, --full). An explicit .maxnreg removes
# them: 128 left one (fp32, K-dim, soft target + softcap + lse gradient: 8 bytes at 128 registers),
# 160 leaves none (that variant takes 144). The aligned common case keeps ptxas's own choice
# (48-80 registers, no spill), so its occupancy is unchanged. The target-gradient variant (SOFT_GRAD)
# spilled 4 bytes at 160 on sm_90: 192. The forward with STATS (entropy + argmax) on unaligned
# layouts spilled 8 bytes at ptxas's own 80 registers: 128.
BWD_UNALIGNED_MAXNREG = 192
FWD_UNALIGNED_MAXNREG = 128


# The distillation forward with the JSD (the most live state: two online LSEs, the mixture terms)
# and a softcap spilled 4 bytes at ptxas's own 80 registers (bf16, BLOCK_C 4096, 8 warps, sm_80;
# static report): an explicit .maxnreg of 128 removes it. Every JSD forward takes it (occupancy: 2
# programs of 8 warps per SM instead of 3; the JSD forward is one of two passes).
JSD_FWD_MAXNREG = 128


def distill_forward_compile_options(jsd: bool) -> dict:
    """Extra compile options of the distillation forward (see JSD_FWD_MAXNREG)."""
    return {"maxnreg": JSD_FWD_MAXNREG} if jsd else {}


def backward_compile_options(vector_friendly: bool) -> dict:
    """Extra compile options of the backward kernel for a layout (see BWD_UNALIGNED_MAXNREG)."""
    return {} if vector_friendly else {"maxnreg": BWD_UNALIGNED_MAXNREG}


def forward_compile_options(vector_friendly: bool) -> dict:
    """Extra compile options of the forward kernel for a layout (see FWD_UNALIGNED_MAXNREG)."""
    return {} if vector_friendly else {"maxnreg": FWD_UNALIGNED_MAXNREG}


def vector_friendly(*tensors) -> bool:
    """True when every (N, C, D) view has unit class stride and 16-byte-aligned rows."""
    for t in tensors:
        es = t.element_size()
        if t.stride(1) != 1 or (t.data_ptr() % 16) or (t.stride(0) * es) % 16:
            return False
        if t.shape[2] > 1 and (t.stride(2) * es) % 16:
            return False
    return True


def backward_grid(R: int, C: int, block_c: int) -> tuple[tuple[int, int], int]:
    """((rows, splits), span) for the backward kernel; span is a multiple of block_c."""
    blocks = triton.cdiv(C, block_c)
    fill = INTERPRET_ROWS_TO_FILL if interpreting() else ROWS_TO_FILL_GPU
    splits = 1 if R >= fill else min(blocks, triton.cdiv(fill, R))
    forced = current_overrides().backward_splits
    if forced is not None:
        splits = max(1, min(blocks, forced))
    span = triton.cdiv(blocks, splits) * block_c
    return (R, triton.cdiv(C, span)), span


# ================================================================================================
# Fused linear cross-entropy (linear/kernels.py). This section is self-contained:
# nothing above depends on it.
#
# Logit tiles (BLOCK_N rows x BLOCK_V classes) live in registers, accumulated over D in BLOCK_D
# steps on the tensor cores; the constraint is registers: 0 spill / stack bytes on sm_80 and sm_90
# for every flag combination, with a margin (perf/static_report.py; triton 3.9, max registers of
# any flag combination, aligned / unaligned rows):
#   16-bit forward  64x128x64, 8 warps, 3 stages (72 KiB smem): 195 / 212 registers.
#   128x128 tiles (the usual GEMM tile, 1.5x fewer operand and fp32-atomic bytes per FLOP) sit at
#   the register limit at 8 warps (255, spilling on some flag sets / layouts) and spill at 16 warps
#   (128 per thread): the logit tile, its per-row statistics and the transform are live at once.
#   fp32 (FMA "ieee" dots, or 3xTF32 / TF32 following torch.get_float32_matmul_precision():
#     "highest" = torch's default -> "ieee", "high" -> "tf32x3", "medium" -> "tf32"):
#     64x64x16, 8 warps, 2 stages (the FMA dot keeps K-slices of both operands in registers).
# Rows whose start is not 16-byte aligned (D * element size % 16 != 0, or odd strides) cannot use
# cp.async and need one 64-bit address per element: half the BLOCK_D (``aligned=False``).
# L2 reuse (H100/H200: 50 MB; one 8-warp program per SM, 132 running at once) decides the orders:
# * forward: 1-D grid of splits x row blocks, split fastest, >= LINEAR_FWD_SPLITS splits (more when
#   row blocks are too few to fill 2 waves): the ~264 running programs (2 per SM) are 16 splits x
#   ~16 row blocks, so each X row block (0.5 MiB at D = 4096) is read by 16 programs and each W
#   tile (1 MiB) by ~16, from a working set of ~8 + 16 MiB, GEMM-like; each split costs 20 bytes
#   per row (partials).
# ================================================================================================

@dataclasses.dataclass(frozen=True)
class LinearConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


LINEAR_FWD_SPLITS = 16
LINEAR_FILL_PROGRAMS = 264
LINEAR_FWD = {16: LinearConfig(64, 128, 64, 8, 3), 32: LinearConfig(64, 64, 16, 8, 2)}
LINEAR_FWD_UNALIGNED = {16: LinearConfig(64, 128, 32, 8, 3), 32: LinearConfig(64, 64, 16, 8, 2)}
# The interpreter runs a tile as numpy ops: wide class tiles (up to the next power of two >= C)
# mean fewer programs (faster tests); BLOCK_D stays small so that D = 123 / 256 still loop over
# several D chunks, BLOCK_N so that N = 130 spans several row blocks.
INTERPRET_LINEAR = LinearConfig(64, 4096, 64, 1, 1)
INTERPRET_LINEAR_SPLITS = 2  # exercise the partials' combine whenever C has 2+ tiles


def linear_config(element_bits: int, aligned: bool = True, C: int = 0) -> LinearConfig:
    """Tiles of the forward-partials kernel for 16- or 32-bit inputs whose rows are (not) 16-byte
    aligned (the backward runs on vendor GEMMs and the chunk kernels: ``linear/chunked.py``)."""
    forced = current_overrides().linear_block_v
    if interpreting():
        cfg = dataclasses.replace(INTERPRET_LINEAR, block_v=min(INTERPRET_LINEAR.block_v,
                                                                max(64, triton.next_power_of_2(C))))
    else:
        cfg = (LINEAR_FWD if aligned else LINEAR_FWD_UNALIGNED)[element_bits]
    if forced is not None:
        cfg = dataclasses.replace(cfg, block_v=min(cfg.block_v, forced))
    return cfg


def linear_forward_splits(N: int, C: int, cfg: LinearConfig) -> tuple[int, int]:
    """(splits, tiles_per_split) of the forward grid (splits * cdiv(N, block_n),)."""
    tiles = triton.cdiv(C, cfg.block_v)
    row_blocks = triton.cdiv(N, cfg.block_n)
    want = INTERPRET_LINEAR_SPLITS if interpreting() else max(
        LINEAR_FWD_SPLITS, triton.cdiv(LINEAR_FILL_PROGRAMS, row_blocks))
    if current_overrides().linear_splits is not None:
        want = current_overrides().linear_splits
    per = triton.cdiv(tiles, max(1, min(tiles, want)))
    return triton.cdiv(tiles, per), per


def linear_dot_precision(element_bits: int) -> str:
    """tl.dot input precision: irrelevant for 16-bit inputs; for fp32 torch's matmul setting."""
    if element_bits == 16:
        return "tf32"
    return {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}[torch.get_float32_matmul_precision()]
