"""Peak extra memory of a callable, on CUDA (allocator statistics) or CPU (profiler memory events)."""
from __future__ import annotations

import gc
from typing import Callable

import torch


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was live before it started.

    Garbage is collected first: a tensor from earlier code freed inside the window would count as
    negative bytes and hide part of the peak.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return memory_curve(prof)[0]


def memory_curve(prof) -> tuple[int, int]:
    """(peak, final) of the running sum of a finished CPU profile's memory events."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak, cur
