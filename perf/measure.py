"""Measurements of one (provider, case) for the sweep: GPU timing and memory, CPU memory and traffic.

GPU: ``triton.testing.do_bench`` (median and 20/80 % quantiles, L2 flushed between runs) and the
peak of ``torch.cuda.max_memory_allocated`` above what was live (``perf/memory.py``); the device's
copy bandwidth and bf16 matmul rate, measured once, are the ceilings the results are compared with.

CPU: one forward + backward, each phase under the profiler (peak bytes allocated above the level at
the phase's start) and, when the traffic counter is given, under ``traffic.count()`` (bytes moved);
the ``fwdbwd`` peak is max(forward peak, bytes left live after forward + backward peak). The
no-grad forward is a separate run. Triton kernels run under the interpreter (slow: small N).
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from typing import Callable, Optional

import torch

from perf.memory import memory_curve, peak_extra_bytes
from perf.providers import Provider, make_inputs

GRAD_SCALE = 0.5   # upstream gradient != 1 (e.g. gradient accumulation), as in training


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


def _phase(fn: Callable[[], object], traffic) -> tuple[int, int, Optional[int]]:
    """(peak extra bytes, net bytes still allocated at the end, bytes moved or None) of fn()."""
    from torch.profiler import ProfilerActivity, profile

    # Blocks allocated under an earlier profiler session and freed by a late garbage collection
    # would show up here as negative events and hide part of this phase's peak: collect first.
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


def measure_cpu(p: Provider, kind: str, N: int, C: int, D: int, dtype: torch.dtype,
                modes: list[str], traffic=None, warm: bool = True) -> dict[str, dict]:
    """{mode: {'peak_bytes', 'measured_bytes'}} for the requested modes, on CPU."""
    fn = p.make()
    inputs, y = make_inputs(kind, N, C, D, dtype, "cpu")
    g = torch.tensor(GRAD_SCALE)
    tr = traffic if p.traffic else None
    if warm:  # compile / lazy initialisation outside the measurement
        fn(*inputs, y).backward(g)
        with torch.no_grad():
            fn(*inputs, y)
        for t in inputs:
            t.grad = None
    out: dict[str, dict] = {}
    if any(m in modes for m in ("fwd", "bwd", "fwdbwd")):
        held = {}

        def fwd():
            held["loss"] = fn(*inputs, y)

        pf, net, bf = _phase(fwd, tr)
        pb, _, bb = _phase(lambda: held.pop("loss").backward(g), tr)
        both = None if bf is None or bb is None else bf + bb
        out["fwd"] = {"peak_bytes": pf, "measured_bytes": bf}
        out["bwd"] = {"peak_bytes": pb, "measured_bytes": bb}
        out["fwdbwd"] = {"peak_bytes": max(pf, net + pb), "measured_bytes": both}
    if "nograd" in modes:
        def nograd():
            with torch.no_grad():
                fn(*inputs, y)

        pn, _, bn = _phase(nograd, tr)
        out["nograd"] = {"peak_bytes": pn, "measured_bytes": bn}
    for t in inputs:
        t.grad = None
    return {m: v for m, v in out.items() if m in modes}


def _gpu_step(fn, inputs, y, mode: str, g):
    if mode == "fwd":
        return lambda: fn(*inputs, y)
    if mode == "nograd":
        def step():
            with torch.no_grad():
                return fn(*inputs, y)
        return step
    if mode == "fwdbwd":
        return lambda: fn(*inputs, y).backward(g)
    loss = fn(*inputs, y)  # bwd: one forward, then time the backward alone
    return lambda: loss.backward(g, retain_graph=True)


def measure_gpu(p: Provider, kind: str, N: int, C: int, D: int, dtype: torch.dtype, mode: str,
                rep_ms: int = 100) -> dict:
    """{'ms', 'ms_p20', 'ms_p80', 'peak_bytes'} of one provider / case / mode on CUDA."""
    from triton.testing import do_bench

    fn = p.make()
    inputs, y = make_inputs(kind, N, C, D, dtype, "cuda")
    g = torch.tensor(GRAD_SCALE, device="cuda")
    step = _gpu_step(fn, inputs, y, mode, g)
    step()  # compile / autotune / warm
    torch.cuda.synchronize()
    q = do_bench(step, warmup=25, rep=rep_ms, grad_to_none=list(inputs), quantiles=[0.5, 0.2, 0.8])
    for t in inputs:
        t.grad = None
    peak = peak_extra_bytes(step, "cuda")
    del step, inputs
    return {"ms": q[0], "ms_p20": q[1], "ms_p80": q[2], "peak_bytes": peak}


def _copy_bandwidth(nbytes: int) -> float:
    """Device-to-device copy of ``nbytes`` bytes: bytes/s, read + write (buffers freed on return)."""
    from triton.testing import do_bench

    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def _matmul_rate(mm: int) -> float:
    """bf16 (mm x mm) @ (mm x mm): FLOP/s (operands freed on return)."""
    from triton.testing import do_bench

    x = torch.randn(mm, mm, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(mm, mm, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: x @ w, warmup=25, rep=200, return_mode="median")
    return 2 * mm ** 3 / (ms * 1e-3)


def device_ceilings(copy_bytes: int = 2 ** 31, mm: int = 8192) -> dict:
    """Measured device-to-device copy bandwidth (bytes/s, read + write) and bf16 matmul FLOP/s."""
    bw = _copy_bandwidth(copy_bytes)
    rate = _matmul_rate(mm)
    torch.cuda.empty_cache()
    return {"copy_Bps": bw, "mm_flops": rate}


class Progress:
    """tqdm when installed, else one line per step on stderr."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, dynamic_ncols=True)
        except ImportError:
            self._bar = None
        self.total, self.done, self.t0, self.desc = total, 0, time.time(), desc

    def step(self, label: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label)
            self._bar.update(1)
            return
        el = time.time() - self.t0
        eta = el / self.done * (self.total - self.done)
        print(f"[{self.desc} {self.done}/{self.total} {el:5.0f}s, ~{eta:4.0f}s left] {label}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
