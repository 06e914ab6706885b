"""Ignored tokens cost nothing: compact the rows that carry a loss before the GEMMs, scatter after.

One helper for every head (the linear CE head here; the KL / log-prob linear forms can call it the
same way)::

    idx = kept_rows(target != ignore_index)     # None: run every row (nothing to gain or compiling)
    x_c = x.index_select(0, idx)                # n_kept rows: GEMMs of n_kept x D x C
    ...                                         # per-row outputs of the kept rows
    out = scatter_rows(x_c_out, idx, N, fill)   # (N, ...) with ``fill`` on the skipped rows

Exact (a skipped row's outputs are the constants its kernel writes for an ignored row) and
deterministic (``index_select`` / ``index_copy_`` of unique indices: no atomics, no reordering of
any sum; the GEMMs see the kept rows in their original order).

Host sync: the vendor GEMMs need host shapes, so the number of kept rows is read on the host
(``nonzero``: one device -> host copy of 8 bytes, ~10-30 us on a GPU), once per call. It pays for
itself as soon as one row in ~1000 is ignored at the Llama-3 head (a row costs 6 D C = 3.2 GFLOP,
~5 us at 650 TFLOP/s), and SFT / RL batches ignore 30-70 %. It runs inside the heads' custom ops,
so ``torch.compile(fullgraph=True, dynamic=True)`` sees an opaque op with fixed output shapes (no
graph break, no recompile); while dynamo or AOTAutograd is *tracing* (``is_compiling()``) no
compaction is attempted. Not CUDA-graph capturable (the sync): such callers run the custom ops
uncompacted by setting ``XENT_COMPACT=0``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

COMPACT_ENV = "XENT_COMPACT"


def compaction_enabled() -> bool:
    """False under ``XENT_COMPACT=0`` or while torch.compile traces (``is_compiling()``)."""
    if os.environ.get(COMPACT_ENV, "1") == "0":
        return False
    return not torch.compiler.is_compiling()


def kept_rows(keep: Tensor) -> Optional[Tensor]:
    """int64 indices (n_kept,) of the True entries of the (N,) bool ``keep``, or None when every
    row is kept, there is no row, or compaction is disabled (the caller then runs all N rows).
    One host sync (the count; module docstring)."""
    if keep.numel() == 0 or not compaction_enabled():
        return None
    idx = keep.nonzero().squeeze(1)  # host sync: the GEMMs below need n_kept on the host
    return None if idx.numel() == keep.numel() else idx


def take_rows(t: Optional[Tensor], idx: Optional[Tensor]) -> Optional[Tensor]:
    """Rows ``idx`` of ``t`` (``t`` itself when idx or t is None)."""
    if t is None or idx is None:
        return t
    return t.index_select(0, idx)


def scatter_rows(part: Tensor, idx: Tensor, n: int, fill: float = 0.0) -> Tensor:
    """(n, *part.shape[1:]) tensor with ``part``'s rows at ``idx`` and ``fill`` elsewhere."""
    out = torch.full((n, *part.shape[1:]), fill, dtype=part.dtype, device=part.device)
    return out.index_copy_(0, idx, part)
