"""The dispatch table between the fused-epilogue head and the vendor-GEMM default, from the rows of
``perf.linear_gpu`` (one GPU run): per (card, N, D, C, ignored fraction) the faster of the two
medians. Written as ``linear_dispatch.csv`` beside ``linear_gpu.csv``; commit it as
perf/results/linear_dispatch.csv once measured: ``xent_triton/linear/dispatch.py`` reads it
(``XENT_LINEAR_PATH=auto``, the default) and takes the fused path for a card / D / C only where
it was faster at every measured ignored fraction at the nearest measured N. The committed file
has no measured row yet (no GPU lent): the vendor path everywhere.
"""
from __future__ import annotations

import csv
import os

FUSED = "xent fused-epilogue"
VENDOR = "xent default"
COLUMNS = ("card", "N", "D", "C", "ignored", "vendor_ms", "fused_ms", "path")


def dispatch_rows(rows: list[dict], card: str) -> list[dict]:
    """One row per shape that has a median for both providers; path = 'fused' or 'vendor'."""
    by = {}
    for r in rows:
        if r.get("median_ms") in ("", None) or r["provider"] not in (FUSED, VENDOR):
            continue
        by.setdefault((r["N"], r["D"], r["C"], r["ignored"]), {})[r["provider"]] = float(r["median_ms"])
    out = []
    for (N, D, C, f), t in sorted(by.items()):
        if FUSED in t and VENDOR in t:
            out.append(dict(card=card, N=N, D=D, C=C, ignored=f, vendor_ms=t[VENDOR], fused_ms=t[FUSED],
                            path="fused" if t[FUSED] < t[VENDOR] else "vendor"))
    return out


def write_dispatch(rows: list[dict], card: str, out_dir: str) -> str:
    path = os.path.join(out_dir, "linear_dispatch.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(dispatch_rows(rows, card))
    return path
