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

import dataclasses
import os

import triton

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


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclasses.dataclass(frozen=True)
class Config:
    block_c: int
    num_warps: int


def _block_sizes():
    b = MIN_BLOCK_C
    while b <= MAX_BLOCK_C:
        yield b
        b *= 2


def _warps(block_c: int) -> int:
    return max(1, min(MAX_WARPS, block_c // (THREADS_PER_WARP * LOGITS_PER_THREAD)))


def config(C: int) -> Config:
    """Block size and warps for a row of C classes (forward and backward use the same)."""
    if interpreting():
        return Config(min(INTERPRET_BLOCK_C, max(MIN_BLOCK_C, triton.next_power_of_2(C))), 1)
    block = min(MAX_BLOCK_C, max(MIN_BLOCK_C, triton.next_power_of_2(C)))
    return Config(block, _warps(block))


def all_configs() -> list[Config]:
    """Every configuration ``config`` can return on a GPU."""
    return [Config(b, _warps(b)) for b in _block_sizes()]


def backward_grid(R: int, C: int, block_c: int) -> tuple[tuple[int, int], int]:
    """((rows, splits), span) for the backward kernel; span is a multiple of block_c."""
    blocks = triton.cdiv(C, block_c)
    fill = INTERPRET_ROWS_TO_FILL if interpreting() else ROWS_TO_FILL_GPU
    splits = 1 if R >= fill else min(blocks, triton.cdiv(fill, R))
    span = triton.cdiv(blocks, splits) * block_c
    return (R, triton.cdiv(C, span)), span
