"""THE memory helper of the perf scripts: peak extra memory of a callable, on CUDA (allocator
statistics) or CPU (profiler memory events), and the profile of one phase (peak, bytes still
allocated at its end, bytes moved when a traffic counter is given).
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
from typing import Callable, Optional

import torch


def peak_extra_bytes(fn: Callable[[], object], device: str, collect: bool = True) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was live before it started.

    Garbage is collected first (``collect``): a tensor from earlier code freed inside the window
    would count as negative bytes and hide part of the peak.
    """
    if collect:
        gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return cpu_phase(fn, collect=False)[0]


def memory_curve(prof) -> tuple[int, int]:
    """(peak, final) of the running sum of a finished CPU profile's memory events."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak, cur


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ log lines) for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_phase(fn: Callable[[], object], traffic=None, collect: bool = True) -> tuple[int, int, Optional[int]]:
    """(peak extra bytes, net bytes still allocated at the end, bytes moved or None) of ``fn()`` on
    CPU; bytes moved when ``traffic`` (``perf.traffic``) is given."""
    from torch.profiler import ProfilerActivity, profile

    # Blocks allocated under an earlier profiler session and freed by a late garbage collection
    # would show up here as negative events and hide part of this phase's peak: collect first.
    if collect:
        gc.collect()
    counted = traffic.count() if traffic is not None else contextlib.nullcontext(None)
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto logs every start/stop on fd 2
        prof.start()
    try:
        with counted as r:
            fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    peak, cur = memory_curve(prof)
    return peak, cur, (r["bytes"] if r is not None else None)
