"""The rows of a sweep (``perf.sweep`` writes them; ``perf.report`` and ``perf.plots`` read them):
the CSV columns, the modes' titles, the headline N, and the providers' titles and order.
"""
from __future__ import annotations

from typing import Optional

from perf.providers import BY_NAME

FIELDS = ["device", "torch", "triton", "python", "date", "commit", "kind", "provider", "mode", "dtype",
          "N", "C", "D", "status", "ms", "ms_p20", "ms_p80", "peak_bytes", "logits_bytes",
          "mem_x_logits", "model_bytes", "measured_bytes", "measured_x_logits", "ideal_bytes",
          "ideal_flops", "ideal_mma_flops", "floor_ms_spec", "floor_ms_measured", "bound",
          "eff_GBps", "frac_copy_bw", "eff_TFLOPs", "frac_mm_rate", "copy_GBps", "mm_TFLOPs"]
MODE_TITLES = {"fwd": "forward", "bwd": "backward", "fwdbwd": "forward + backward",
               "nograd": "no-grad forward"}
HEADLINE_N = 8192
GiB = 2 ** 30


def number(v) -> Optional[float]:
    """A CSV cell as a float (None when empty or not a number)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def title(name: str) -> str:
    """A provider's display title (its name when unknown)."""
    return BY_NAME[name].title if name in BY_NAME else name


def order(rows: list[dict], kind: str) -> list[str]:
    """The providers of ``kind`` present in ``rows``, in the provider table's order."""
    names = {r["provider"] for r in rows if r["kind"] == kind}
    return [p for p in BY_NAME if p in names]
