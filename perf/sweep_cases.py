"""One case of the sweep (``perf.sweep``): its providers measured on CPU or timed on a GPU.

GPU: the providers of one case share the same inputs and are timed paired and interleaved
(``perf.measure.paired``: one call of each per iteration, the order rotated, CUDA events, L2
flushed before each call), then each one's peak extra memory (``perf.memory``). The backward
alone (``bwd``) needs each provider's forward graph held: those providers are timed one after
the other (one graph in memory at a time).

CPU: one forward + backward, each phase under the profiler (peak bytes allocated above the level at
the phase's start) and, when the traffic counter is given, under ``traffic.count()`` (bytes moved);
the ``fwdbwd`` peak is max(forward peak, bytes left live after forward + backward peak). The
no-grad forward is a separate run. Triton kernels run under the interpreter (slow: small N).
"""
from __future__ import annotations

import sys
import time
from typing import Callable

import torch

from perf import measure
from perf.memory import cpu_phase, peak_extra_bytes
from perf.providers import Provider, make_inputs

GRAD_SCALE = 0.5   # upstream gradient != 1 (e.g. gradient accumulation), as in training


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

        pf, net, bf = cpu_phase(fwd, tr)
        pb, _, bb = cpu_phase(lambda: held.pop("loss").backward(g), tr)
        both = None if bf is None or bb is None else bf + bb
        out["fwd"] = {"peak_bytes": pf, "measured_bytes": bf}
        out["bwd"] = {"peak_bytes": pb, "measured_bytes": bb}
        out["fwdbwd"] = {"peak_bytes": max(pf, net + pb), "measured_bytes": both}
    if "nograd" in modes:
        def nograd():
            with torch.no_grad():
                fn(*inputs, y)

        pn, _, bn = cpu_phase(nograd, tr)
        out["nograd"] = {"peak_bytes": pn, "measured_bytes": bn}
    for t in inputs:
        t.grad = None
    return {m: v for m, v in out.items() if m in modes}


def _gpu_step(fn, inputs, y, mode: str, g) -> Callable[[], None]:
    """One timed call of ``mode``; gradients dropped after each (the next call allocates them)."""
    def drop():
        for t in inputs:
            t.grad = None

    if mode == "nograd":
        def step():
            with torch.no_grad():
                fn(*inputs, y)
    elif mode == "fwd":
        def step():
            fn(*inputs, y)
    elif mode == "fwdbwd":
        def step():
            fn(*inputs, y).backward(g)
            drop()
    else:  # bwd: one forward now, then the backward alone (graph retained)
        loss = fn(*inputs, y)

        def step():
            loss.backward(g, retain_graph=True)
            drop()
    return step


def _status(e: Exception) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "oom"
    msg = str(e).splitlines()[0][:120] if str(e) else ""
    return f"error: {type(e).__name__}: {msg}"


def time_gpu_case(provs: list[Provider], kind: str, N: int, C: int, D: int, dtype: torch.dtype, mode: str,
                  iters: int, device: str = "cuda") -> dict[str, dict]:
    """{provider: {'status', and when ok 'ms', 'ms_p20', 'ms_p80', 'peak_bytes'}} of one case
    (``device="cpu"``: the same on CPU tensors, to check the loop without a GPU)."""
    cuda = device == "cuda"
    inputs, y = make_inputs(kind, N, C, D, dtype, device)
    g = torch.tensor(GRAD_SCALE, device=device)
    out: dict[str, dict] = {}
    groups = [[p] for p in provs] if mode == "bwd" else [provs]  # bwd: one held graph at a time
    for group in groups:
        steps = {}
        for p in group:
            try:
                steps[p.name] = _gpu_step(p.make(), inputs, y, mode, g)
                steps[p.name]()  # compile / autotune / warm
                if cuda:
                    torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a failing peer must not stop the sweep
                steps.pop(p.name, None)
                out[p.name] = {"status": _status(e)}
        try:
            times = measure.paired(steps, iters, warmup=2, device=device) if steps else {}
        except Exception as e:  # noqa: BLE001
            out.update({n: {"status": _status(e)} for n in steps})
            steps, times = {}, {}
        for n, step in steps.items():
            s = measure.summary(times[n])
            out[n] = {"status": "ok", "ms": s["median"] * 1e3, "ms_p20": s["p20"] * 1e3,
                      "ms_p80": s["p80"] * 1e3, "peak_bytes": peak_extra_bytes(step, device)}
        steps.clear()
        if cuda:
            torch.cuda.empty_cache()
    for t in inputs:
        t.grad = None
    return out


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
