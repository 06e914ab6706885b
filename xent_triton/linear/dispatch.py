"""Which head serves ``linear_cross_entropy``: the vendor-GEMM default (``chunked.py``) or the
fused-epilogue GEMM family (``fused_head.py``: no host sync, 16-bit chunk buffer).

* ``XENT_LINEAR_PATH`` = ``auto`` (default) | ``vendor`` | ``fused``, or the context manager
  ``linear_path("fused")`` (it wins over the variable): force either path. Forcing ``fused`` on a
  call it cannot serve raises ValueError naming the option or input (``refusals``).
* ``auto``: the fused path only on CUDA, for a call it can serve, and only where the dispatch
  table (``perf/results/linear_dispatch.csv`` of a source checkout, or the CSV named by
  ``XENT_LINEAR_DISPATCH``; written by ``python -m perf.linear_gpu``) has rows for this card, D
  and C and the fused path was faster at every measured ignored fraction at the nearest measured N.
  No row (the committed table has none yet): the vendor path.
* While torch.compile traces the call: the vendor path (its custom ops), whatever is requested
  (the fused head is eager only: an autograd.Function launching Triton kernels directly).
"""
from __future__ import annotations

import contextlib
import contextvars
import csv
import functools
import math
import os
import pathlib
from typing import Iterator, Optional

import torch
from torch import Tensor

from ..core.options import LossOptions
from ..core.runtime import is_compiling, uses_triton
from .fused_head import FUSED_OPTIONS

PATH_ENV = "XENT_LINEAR_PATH"
TABLE_ENV = "XENT_LINEAR_DISPATCH"
PATHS = ("auto", "vendor", "fused")
DEFAULT_TABLE = pathlib.Path(__file__).resolve().parents[2] / "perf" / "results" / "linear_dispatch.csv"
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("xent_linear_path", default=None)


@contextlib.contextmanager
def linear_path(path: str) -> Iterator[None]:
    """Force ``path`` ("auto", "vendor", "fused") for the calls inside the block."""
    if path not in PATHS:
        raise ValueError(f"linear_path must be one of {PATHS}, got {path!r}")
    token = _forced.set(path)
    try:
        yield
    finally:
        _forced.reset(token)


def requested_path() -> str:
    path = _forced.get() or os.environ.get(PATH_ENV, "auto") or "auto"
    if path not in PATHS:
        raise ValueError(f"{PATH_ENV} must be one of {PATHS}, got {path!r}")
    return path


def refusals(x: Tensor, w: Tensor, opts: LossOptions, *, accum_fp32: bool, need_grad: bool,
             token_weight: Optional[Tensor], return_lse: bool, return_stats: bool) -> list[str]:
    """What keeps the fused path from serving this call, each naming the option or input."""
    why = []
    if x.dtype not in (torch.bfloat16, torch.float16) or w.dtype != x.dtype:
        why.append(f"input dtype {x.dtype} / linear_weight dtype {w.dtype} (16-bit, one dtype)")
    elif not uses_triton(x):
        why.append("a CPU tensor without TRITON_INTERPRET=1 (Triton kernels only)")
    default = LossOptions()
    for name, ok in FUSED_OPTIONS.items():
        if not ok and getattr(opts, name) != getattr(default, name):
            why.append(f"{name}={getattr(opts, name)!r}")
    if opts.reduction == "none" and need_grad:
        why.append("reduction='none' with a gradient (per-token upstream gradients)")
    if return_lse:
        why.append("return_lse=True")
    if return_stats:
        why.append("return_stats=True")
    if token_weight is not None:
        why.append("token_weight")
    if not accum_fp32:
        why.append("grad_accum_dtype other than float32 (dW accumulates in fp32 across chunks)")
    return why


def use_fused(x: Tensor, w: Tensor, opts: LossOptions, **call) -> bool:
    """True when the fused head serves this call (module docstring); ValueError when it is forced
    and cannot."""
    if is_compiling():  # traced by torch.compile: the vendor head's custom ops (no env / context reads)
        return False
    path = requested_path()
    if path == "vendor":
        return False
    why = refusals(x, w, opts, **call)
    if path == "fused":
        if why:
            raise ValueError(f"{PATH_ENV}=fused: the fused-epilogue linear head does not support "
                             f"{'; '.join(why)}")
        return True
    if why or not x.is_cuda:
        return False
    return table_prefers_fused(torch.cuda.get_device_name(x.device), x.shape[0], x.shape[1], w.shape[0],
                               load_table())


def load_table(path: Optional[str] = None) -> list[dict]:
    path = path or os.environ.get(TABLE_ENV) or str(DEFAULT_TABLE)
    try:
        return _read(path, os.path.getmtime(path))
    except OSError:
        return []


@functools.lru_cache(maxsize=4)
def _read(path: str, mtime: float) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def table_prefers_fused(card: str, N: int, D: int, C: int, rows: list[dict]) -> bool:
    """Rows of this card, D and C; at the measured N nearest to N (in log scale), fused iff its
    path is "fused" at every measured ignored fraction."""
    mine = [r for r in rows if r.get("card") == card and int(r["D"]) == D and int(r["C"]) == C]
    if not mine or N <= 0:
        return False
    nearest = min({int(r["N"]) for r in mine}, key=lambda n: abs(math.log(n / N)))
    return all(r["path"] == "fused" for r in mine if int(r["N"]) == nearest)
