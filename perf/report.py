"""Markdown tables of a sweep (``perf.sweep``; plots in ``perf.plots``); also on a saved CSV:

    python -m perf.report perf/out/sweep.csv        # rewrites sweep.md and the PNGs beside it
"""
from __future__ import annotations

import argparse
import csv
import os
from typing import Optional

from perf.plots import plots
from perf.providers import BY_NAME, ours
from perf.rows import MODE_TITLES, GiB, number, order, title


def _torch(kind: str) -> str:
    return "torch" if kind == "ce" else "torch_linear"


def _num(v: float, fmt: str) -> str:
    return f"{v:.1e}" if 0 < abs(v) < 0.01 else fmt.format(v)


def _span(vals: list[float], fmt: str = "{:.2f}") -> str:
    """'lo–hi' of the values (one number when they agree at this precision)."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    lo, hi = _num(min(vals), fmt), _num(max(vals), fmt)
    return lo if lo == hi else f"{lo}–{hi}"


TINY = 0.01  # below this multiple of the logits, a memory is per-token bookkeeping: no ratio


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b is not None and b >= TINY else None


def _header(meta: dict, cuda: bool) -> list[str]:
    out = [f"- machine: {meta['device']}",
           f"- versions: torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}",
           f"- date: {meta['date']}; commit: `{meta['commit']}`",
           f"- command: `{meta['command']}` ({meta['seconds']:.0f} s)",
           f"- providers: {', '.join(title(p) for p in meta['providers'])}"]
    if meta.get("missing"):
        out.append(f"- not available here (not installed, or GPU only): {', '.join(meta['missing'])}")
    if not cuda:
        out.append(f"- measured at N = {meta['cpu_rows']} rows on CPU (Triton kernels under the "
                   "interpreter); every figure is a multiple of the logits' bytes N·C·B, which does not "
                   "depend on N")
    return out


def _cpu_tables(rows, kind) -> list[str]:
    names = order(rows, kind)
    me = ours(kind)
    peers = [p for p in names if p != me]
    keys = sorted({(r["mode"], r["dtype"]) for r in rows if r["kind"] == kind},
                  key=lambda k: (list(MODE_TITLES).index(k[0]), k[1]))
    Cs = sorted({int(r["C"]) for r in rows if r["kind"] == kind})
    get = {(r["provider"], r["mode"], r["dtype"], int(r["C"])): r for r in rows if r["kind"] == kind}
    note = []
    if kind == "linear":
        Ds = sorted({str(r["D"]) for r in rows if r["kind"] == kind})
        note = [f"\n(linear head, D = {', '.join(Ds)}: the peak includes the classifier's gradient (C·D) and "
                "fp32 accumulators, so these multiples of N·C·B depend on D/N.)"]
    out = note + [
        f"\n### Peak extra memory ÷ logits bytes ({kind}; range over C = {', '.join(map(str, Cs))})\n",
        "| mode | dtype | " + " | ".join(title(p) for p in names)
        + (f" | {me} ÷ torch eager | {me} ÷ best peer |" if me in names else " |"),
        "|---|---|" + "---:|" * (len(names) + (2 if me in names else 0))]
    for mode, dt in keys:
        cells = [_span([number(get.get((p, mode, dt, C), {}).get("mem_x_logits")) for C in Cs])
                 for p in names]
        if me in names:
            vs_torch, vs_best = [], []
            for C in Cs:
                m = number(get.get((me, mode, dt, C), {}).get("mem_x_logits"))
                t = number(get.get((_torch(kind), mode, dt, C), {}).get("mem_x_logits"))
                pv = [v for v in (number(get.get((p, mode, dt, C), {}).get("mem_x_logits")) for p in peers)
                      if v is not None]
                vs_torch.append(_ratio(m, t))
                vs_best.append(_ratio(m, min(pv) if pv else None))
            tiny = f"both < {TINY}"
            cells += [_span(vs_torch, "{:.3f}").replace("n/a", tiny),
                      _span(vs_best, "{:.3f}").replace("n/a", tiny)]
        out.append(f"| {MODE_TITLES[mode]} | {dt} | " + " | ".join(cells) + " |")
    out += [f"\n### Bytes moved ÷ logits bytes ({kind}): measured by traffic.py (roofline model)\n",
            "| mode | dtype | " + " | ".join(title(p) for p in names) + " |",
            "|---|---|" + "---:|" * len(names)]
    for mode, dt in keys:
        cells = []
        for p in names:
            meas = _span([number(get.get((p, mode, dt, C), {}).get("measured_x_logits")) for C in Cs])
            mod = [number(get[(p, mode, dt, C)]["model_bytes"]) for C in Cs if (p, mode, dt, C) in get]
            lb = [number(get[(p, mode, dt, C)]["logits_bytes"]) for C in Cs if (p, mode, dt, C) in get]
            model = _span([m / b for m, b in zip(mod, lb) if m is not None and b])
            cells.append(f"{meas} ({model})")
        out.append(f"| {MODE_TITLES[mode]} | {dt} | " + " | ".join(cells) + " |")
    return out


def _gpu_tables(rows, kind) -> list[str]:
    names, me = order(rows, kind), ours(kind)
    peers = [p for p in names if p != me]
    get = {(r["provider"], r["mode"], r["dtype"], int(r["N"]), int(r["C"])): r
           for r in rows if r["kind"] == kind}
    out = []
    groups = sorted({(r["mode"], r["dtype"]) for r in rows if r["kind"] == kind},
                    key=lambda k: (list(MODE_TITLES).index(k[0]), k[1]))
    for mode, dt in groups:
        cases = sorted({(int(r["N"]), int(r["C"])) for r in rows if r["kind"] == kind
                        and r["mode"] == mode and r["dtype"] == dt})
        out += [f"\n### {kind}: {MODE_TITLES[mode]}, {dt} — time in ms (median), peak extra memory in GiB\n",
                "| N | C | floor ms | " + " | ".join(title(p) for p in names)
                + f" | speedup vs torch | vs best peer | {me} % of floor | {me} GiB | mem ÷ torch"
                " | mem ÷ best peer |",
                "|---:|---:|---:|" + "---:|" * (len(names) + 6)]
        for N, C in cases:
            rs = {p: get.get((p, mode, dt, N, C), {}) for p in names}
            ms = {p: number(r.get("ms")) if r.get("status") == "ok" else None for p, r in rs.items()}
            mem = {p: number(r.get("peak_bytes")) if r.get("status") == "ok" else None for p, r in rs.items()}
            any_r = next((r for r in rs.values() if r), {})
            floor = number(any_r.get("floor_ms_measured")) or number(any_r.get("floor_ms_spec"))

            def cell(p):
                r = rs[p]
                st = r.get("status", "")
                if ms[p] is not None:
                    return f"{ms[p]:.3f}"
                return {"oom": "OOM", "skipped: estimated OOM": "est. OOM", "skipped: time budget": "—"}.get(
                    st, "err" if st.startswith("error") else st)
            pm = [ms[p] for p in peers if ms[p] is not None]
            pk = [mem[p] for p in peers if mem[p] is not None]
            t0, m0 = ms.get(me), mem.get(me)
            tt, mt = ms.get(_torch(kind)), mem.get(_torch(kind))
            div = lambda a, b: f"{a / b:.2f}" if a is not None and b else "–"  # noqa: E731
            out.append(f"| {N} | {C} | {floor:.3f} | " if floor else f"| {N} | {C} | – | ")
            out[-1] += " | ".join(cell(p) for p in names) + " | " + " | ".join([
                div(tt, t0), div(min(pm) if pm else None, t0),
                f"{100 * floor / t0:.0f}%" if floor and t0 else "–",
                f"{m0 / GiB:.2f}" if m0 is not None else "–", div(m0, mt),
                div(m0, min(pk) if pk else None)]) + " |"
    return out


def markdown(rows: list[dict], meta: dict, cuda: bool) -> str:
    kinds = [k for k in ("ce", "linear") if any(r["kind"] == k for r in rows)]
    out = [f"## {'GPU' if cuda else 'CPU'} sweep", ""] + _header(meta, cuda)
    if cuda and rows:
        r = rows[0]
        out.append(f"- measured ceilings: device-to-device copy {float(r['copy_GBps']):.0f} GB/s, "
                   f"bf16 matmul {float(r['mm_TFLOPs']):.0f} TFLOP/s; floor = roofline "
                   "(xent_triton.roofline) at these "
                   "ceilings; speedup = other ms ÷ ours, memory ratio = ours ÷ other (< 1: ours smaller)")
    for k in kinds:
        out += _gpu_tables(rows, k) if cuda else _cpu_tables(rows, k)
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="a sweep.csv written by python -m perf.sweep")
    src = ap.parse_args(argv).csv
    with open(src) as fh:
        rows = list(csv.DictReader(fh))
    gpu = bool(rows) and bool(rows[0].get("copy_GBps"))
    meta = {k: rows[0][k] for k in ("device", "torch", "triton", "python", "date", "commit")} if rows else {}
    meta.update(command=f"python -m perf.report {src}", seconds=0.0, cpu_rows=rows[0]["N"] if rows else 0,
                providers=sorted({r["provider"] for r in rows}, key=list(BY_NAME).index), missing=[])
    with open(os.path.join(os.path.dirname(src), "sweep.md"), "w") as fh:
        fh.write(markdown(rows, meta, gpu))
    print(plots(rows, os.path.dirname(src), gpu))


if __name__ == "__main__":
    main()
