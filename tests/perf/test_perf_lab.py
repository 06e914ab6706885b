"""The perf lab's shared helpers (perf/measure.py, perf/sweep_cases.py): the paired timing every
script uses runs each callable once per iteration in a rotated order, and the sweep's GPU case loop
(run here on CPU tensors) times its providers side by side and records a failing one as such."""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from perf import measure  # noqa: E402


def test_paired_rotates_the_order_and_skips_the_warmup():
    calls: list[str] = []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    times = measure.paired(fns, iters=3, warmup=1)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert {n: len(t) for n, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)


@pytest.mark.parametrize("times, ref, expected", [
    pytest.param({"x": [2.0, 9.0, 3.0], "r": [1.0, 3.0, 1.0]}, "r", 3.0, id="per-iteration"),
    pytest.param({"x": [1.0, 1.0, 1.0], "r": [1.0, 1.0, 1.0]}, "r", 1.0, id="equal"),
])
def test_ratio_is_the_median_of_per_iteration_ratios(times, ref, expected):
    assert measure.ratio(times, "x", ref) == expected  # not 14 / 5 (the ratio of sums)


def test_summary_quantiles():
    s = measure.summary([float(v) for v in range(1, 12)])
    assert (s["median"], s["p20"], s["p80"], s["min"]) == (6.0, 3.0, 9.0, 1.0)


def test_gpu_case_loop_times_providers_side_by_side_and_records_failures(monkeypatch):
    from perf import sweep_cases
    from perf.providers import BY_NAME, Provider

    # the profiler's peak is perf.memory's (tests/cross_entropy/test_memory.py): not re-run here
    peaks: list[str] = []
    monkeypatch.setattr(sweep_cases, "peak_extra_bytes", lambda step, device: peaks.append(device) or 0)

    def broken():
        def fn(x, y):
            raise ValueError("broken peer")
        return fn

    provs = [BY_NAME["torch"], BY_NAME["torch_float"], Provider("broken", "ce", broken)]
    for mode in ("fwdbwd", "bwd"):  # providers paired / one held graph at a time
        out = sweep_cases.time_gpu_case(provs, "ce", 7, 33, 0, torch.float32, mode, iters=2, device="cpu")
        assert out["broken"]["status"].startswith("error: ValueError: broken peer"), out
        for name in ("torch", "torch_float"):
            r = out[name]
            assert r["status"] == "ok" and 0 < r["ms_p20"] <= r["ms"] <= r["ms_p80"], (mode, r)
            assert r["peak_bytes"] == 0
    assert peaks == ["cpu"] * 4
