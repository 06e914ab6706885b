"""THE timing helper of the perf scripts: paired, interleaved times of the callables compared.

``paired(fns, iters)`` runs every callable once per iteration, the order rotated by one each
iteration, so that load on a shared machine, clock drift and a neighbour's burst hit them all
alike; on CUDA each call is timed by CUDA events with the L2 cache flushed before it (outside the
timing), on CPU by ``time.perf_counter``. ``summary`` gives the median and 20 / 80 % quantiles of
one callable's times, ``ratio`` the median of the per-iteration ratios of two of them (the figure
a comparison reports: both were timed in the same iteration).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

L2_FLUSH_BYTES = 256 * 2 ** 20  # larger than any GPU's L2 cache (as triton.testing.do_bench)


def _cuda_timer(flush: Optional[torch.Tensor]) -> Callable[[Callable[[], object]], float]:
    def run(fn: Callable[[], object]) -> float:
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e-3
    return run


def _cpu_timer(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired(fns: dict[str, Callable[[], object]], iters: int, warmup: int = 1, device: str = "cpu",
           flush_l2: bool = True) -> dict[str, list[float]]:
    """{name: seconds of each of ``iters`` iterations}: every iteration calls every function once,
    in an order rotated by one per iteration, after ``warmup`` such iterations (not recorded).
    ``device="cuda"``: CUDA events, the L2 cache flushed before each call when ``flush_l2``."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if device == "cuda":
        torch.cuda.synchronize()
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if flush_l2 else None
        timer = _cuda_timer(flush)
    else:
        timer = _cpu_timer
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for it in range(warmup + iters):
        k = it % len(names)
        for n in names[k:] + names[:k]:
            t = timer(fns[n])
            if it >= warmup:
                times[n].append(t)
    return times


def summary(times: list[float]) -> dict[str, float]:
    """Median, 20 % and 80 % quantiles and minimum of one function's times (seconds)."""
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"median": statistics.median(times), "p20": q[1], "p80": q[7], "min": min(times)}


def ratio(times: dict[str, list[float]], name: str, ref: str) -> float:
    """Median over iterations of (time of ``name`` / time of ``ref``) in the same iteration."""
    return statistics.median(a / b for a, b in zip(times[name], times[ref]))


def _ceiling_times(copy_bytes: int, mm: int, iters: int) -> dict[str, list[float]]:
    a = torch.empty(copy_bytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    x = torch.randn(mm, mm, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(mm, mm, device="cuda", dtype=torch.bfloat16)
    return paired({"copy": lambda: b.copy_(a), "mm": lambda: x @ w}, iters, warmup=3, device="cuda")


def device_ceilings(copy_bytes: int = 2 ** 31, mm: int = 8192, iters: int = 20) -> dict:
    """Measured device-to-device copy bandwidth (bytes/s, read + write) and bf16 (mm x mm) @ (mm x mm)
    matmul FLOP/s: medians of ``paired`` times (buffers freed on return)."""
    t = _ceiling_times(copy_bytes, mm, iters)
    torch.cuda.empty_cache()
    return {"copy_Bps": 2 * copy_bytes / statistics.median(t["copy"]),
            "mm_flops": 2 * mm ** 3 / statistics.median(t["mm"])}
