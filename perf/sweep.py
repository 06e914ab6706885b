"""Performance sweep of xent_triton against its peers, on a GPU or (machine-independent figures) on CPU.

    python -m perf.sweep --out perf/out                 # full sweep (GPU) / memory+traffic sweep (CPU)
    python -m perf.sweep --out perf/out --quick         # a few cases
    python -m perf.sweep --out perf/out --providers xent_triton torch --modes fwdbwd nograd

GPU: time (median and 20/80 % quantiles of ``--iters`` paired, interleaved iterations: the providers
of a case timed side by side, ``perf/sweep_cases.py``) and peak extra memory of each provider, the
device's measured copy bandwidth and bf16 matmul rate, and the roofline floor of each case
(``xent_triton.roofline``) at the datasheet peaks and at the measured ceilings.
CPU: per provider the peak extra memory (profiler) and the bytes moved (the traffic counter,
``perf/traffic.py``), measured at a small N (``--cpu-rows``) with the Triton kernels under the
interpreter, reported as multiples of the logits' bytes (scale-free), beside the model's bytes.

Writes ``sweep.csv`` (one row per provider x case x mode, stamped), ``sweep.md`` (tables with the
speedup and memory ratio against torch eager and the best peer) and PNG plots under ``--out``.
Cases that would not fit in GPU memory (estimated first) are skipped and recorded as such.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

from perf._env import interpret_without_cuda, run_stamp

# xent_triton and the perf modules that import it (sweep_cases, plots, providers, report) are imported
# inside the functions, after main() has set TRITON_INTERPRET on a machine without CUDA.
CUDA = torch.cuda.is_available()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOKENS = [1024, 2048, 4096, 8192, 16384, 32768]
VOCABS = [32000, 50257, 128256, 151936, 262144]
QUICK_TOKENS, QUICK_VOCABS = [4096, 16384], [32000, 128256, 262144]
def stamp(argv: list[str]) -> dict:
    """Where and with what the figures were measured."""
    import platform as _platform

    cpu = _platform.processor() or _platform.machine()
    device = (torch.cuda.get_device_name() if CUDA
              else f"CPU ({cpu}, {os.cpu_count()} cores, Triton interpreter)")
    return run_stamp(argv, device)


def load_traffic():
    """The traffic counter (``perf.traffic``), or None on CUDA / if unusable."""
    if CUDA:
        return None
    try:
        from perf import traffic
        return traffic
    except Exception as e:  # noqa: BLE001 - e.g. a triton whose interpreter it cannot hook
        print(f"traffic counter not usable ({e}); no measured bytes", file=sys.stderr)
        return None


def model_fields(p, kind, N, C, D, B, mode, dev, ceil) -> dict:
    """Roofline figures of one row: the provider's own model, and the ideal (our kernels') floor."""
    from perf import providers as P
    from xent_triton import roofline

    ign = P.ignored_fraction(N)  # make_inputs ignores every 10th token, for both kinds
    if kind == "ce":
        ideal = roofline.cross_entropy_cost(N, C, B, mode, ignored=ign)
        own = roofline.cross_entropy_cost(N, C, B, mode, p.model, ignored=ign) if p.model else None
    else:
        ideal = roofline.linear_cross_entropy_cost(N, D, C, B, mode, ignored=ign)
        own = roofline.linear_cross_entropy_cost(N, D, C, B, mode, p.model, ignored=ign) if p.model else None
    f = {"logits_bytes": N * C * B, "ideal_bytes": int(ideal.bytes), "ideal_flops": int(ideal.flops),
         "ideal_mma_flops": int(ideal.mma_flops), "model_bytes": int(own.bytes) if own else ""}
    if dev is not None:
        f["floor_ms_spec"] = roofline.time_floor(ideal, dev) * 1e3
        f["bound"] = roofline.bound(ideal, dev)
    if ceil:  # an unknown GPU: memory and tensor terms only, from the measured ceilings
        d = dev or roofline.Device("measured", ceil["copy_Bps"], ceil["mm_flops"], float("inf"), float("inf"))
        f["floor_ms_measured"] = roofline.time_floor(ideal, d, ceil["copy_Bps"], ceil["mm_flops"]) * 1e3
    return f


def gpu_need_bytes(p, kind, N, C, D, B) -> float:
    """Conservative memory estimate of a GPU case (inputs, gradients, provider's extra)."""
    from perf import providers as P

    inputs = N * C * B if kind == "ce" else (N + C) * D * B
    acc = 0 if kind == "ce" else (N + C) * D * 4
    return 2 * inputs + acc + P.extra_bytes_per_logit(p.name, B) * N * C + 2 ** 30


def run_gpu(args, provs, base, write) -> None:
    from perf import measure as M
    from perf import sweep_cases as S
    from xent_triton import roofline

    dev = roofline.device_for(base["device"])
    ceil = M.device_ceilings()
    print(f"measured ceilings: copy {ceil['copy_Bps'] / 1e9:.0f} GB/s, bf16 matmul "
          f"{ceil['mm_flops'] / 1e12:.0f} TFLOP/s; datasheet: {dev}", file=sys.stderr)
    base = dict(base, copy_GBps=ceil["copy_Bps"] / 1e9, mm_TFLOPs=ceil["mm_flops"] / 1e12)
    # Modes outermost, in the order given: under --time-budget the first modes are complete.
    cases = [(m, k, dt, N, C) for m in args.modes for k in args.kinds for dt in args.dtypes
             for N in args.tokens for C in args.vocabs]
    bar, t0 = S.Progress(len(cases), "gpu sweep"), time.time()
    for mode, kind, dt, N, C in cases:
        B = DTYPES[dt].itemsize
        rows = {}
        for p in (p for p in provs if p.kind == kind):
            rows[p.name] = dict(base, kind=kind, provider=p.name, mode=mode, dtype=dt, N=N, C=C,
                                D=args.hidden if kind == "linear" else "")
            rows[p.name].update(model_fields(p, kind, N, C, args.hidden, B, mode, dev, ceil))
        free, _ = torch.cuda.mem_get_info()
        fit = []
        for p in (p for p in provs if p.kind == kind):
            if args.time_budget and time.time() - t0 > args.time_budget:
                rows[p.name]["status"] = "skipped: time budget"
            elif gpu_need_bytes(p, kind, N, C, args.hidden, B) > 0.9 * free:
                rows[p.name]["status"] = "skipped: estimated OOM"
            else:
                fit.append(p)
        got = S.time_gpu_case(fit, kind, N, C, args.hidden, DTYPES[dt], mode, args.iters) if fit else {}
        for name, r in got.items():
            row = rows[name]
            row.update(r)
            if r["status"] != "ok":
                continue
            row["mem_x_logits"] = r["peak_bytes"] / row["logits_bytes"]
            s = r["ms"] * 1e-3
            row["eff_GBps"] = row["ideal_bytes"] / s / 1e9
            row["frac_copy_bw"] = row["ideal_bytes"] / s / ceil["copy_Bps"]
            if row["ideal_mma_flops"]:
                row["eff_TFLOPs"] = row["ideal_mma_flops"] / s / 1e12
                row["frac_mm_rate"] = row["ideal_mma_flops"] / s / ceil["mm_flops"]
        for row in rows.values():
            write(row)
        done = ", ".join(f"{n} {r['status']}" for n, r in rows.items())
        bar.step(f"{kind} {dt} N={N} C={C} {mode}: {done}")
    bar.close()


def run_cpu(args, provs, base, write) -> None:
    from perf import sweep_cases as S

    tr = load_traffic()
    N = args.cpu_rows
    cases = [(k, C, dt) for k in args.kinds for dt in args.dtypes for C in args.vocabs]
    plan = [(c, p) for c in cases for p in provs if p.kind == c[0]]
    warmed = set()
    bar = S.Progress(len(plan), "cpu sweep")
    for (kind, C, dt), p in plan:
        D = args.cpu_hidden
        B = DTYPES[dt].itemsize
        if p.triton and (p.name, dt) not in warmed:  # lazy init once, at a tiny shape
            S.measure_cpu(p, kind, 4, 256, 16, DTYPES[dt], ["fwdbwd"], None, warm=False)
            warmed.add((p.name, dt))
        try:
            res = S.measure_cpu(p, kind, N, C, D, DTYPES[dt], args.modes, tr, warm=not p.triton)
            status = "ok"
        except Exception as e:  # noqa: BLE001
            res, status = {}, f"error: {type(e).__name__}: {e}"[:160]
        for mode in args.modes:
            row = dict(base, kind=kind, provider=p.name, mode=mode, dtype=dt, N=N, C=C,
                       D=D if kind == "linear" else "", status=status)
            row.update(model_fields(p, kind, N, C, D, B, mode, None, None))
            r = res.get(mode)
            if r:
                row["peak_bytes"] = r["peak_bytes"]
                row["mem_x_logits"] = r["peak_bytes"] / row["logits_bytes"]
                if r["measured_bytes"] is not None:
                    row["measured_bytes"] = r["measured_bytes"]
                    row["measured_x_logits"] = r["measured_bytes"] / row["logits_bytes"]
            write(row)
        bar.step(f"{p.name} {kind} {dt} N={N} C={C}: {status}")
    bar.close()


def parse(argv: list[str]) -> argparse.Namespace:
    from perf import providers as P
    from xent_triton import roofline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (CSV, markdown, PNG)")
    ap.add_argument("--quick", action="store_true", help="a few cases: N in %s, C in %s, bf16"
                    % (QUICK_TOKENS, QUICK_VOCABS))
    ap.add_argument("--providers", nargs="+", choices=list(P.BY_NAME), help="default: all installed")
    ap.add_argument("--modes", nargs="+", choices=list(roofline.MODES),
                    default=["fwdbwd", "nograd", "fwd", "bwd"])
    ap.add_argument("--kinds", nargs="+", choices=["ce", "linear"],
                    help="default: ce, plus (GPU) linear when xent_triton.linear_cross_entropy exists")
    ap.add_argument("--tokens", nargs="+", type=int, help=f"GPU N values (default {TOKENS})")
    ap.add_argument("--vocabs", nargs="+", type=int, help=f"C values (default {VOCABS})")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: bfloat16 float32")
    ap.add_argument("--hidden", type=int, default=4096, help="D of the linear head on GPU")
    ap.add_argument("--cpu-rows", type=int, default=64, help="N measured on CPU (interpreter: keep small)")
    ap.add_argument("--cpu-hidden", type=int, default=256, help="D of the linear head on CPU")
    ap.add_argument("--iters", type=int, default=20, help="GPU: paired iterations per case (median)")
    ap.add_argument("--time-budget", type=float, default=0, help="GPU: stop starting cases after S seconds")
    a = ap.parse_args(argv)
    a.tokens = a.tokens or (QUICK_TOKENS if a.quick else TOKENS)
    a.vocabs = a.vocabs or (QUICK_VOCABS if a.quick else VOCABS)
    a.dtypes = a.dtypes or (["bfloat16"] if a.quick else ["bfloat16", "float32"])
    # The linear head under the CPU interpreter takes minutes per case: CPU runs it only on request.
    linear = CUDA and hasattr(P.xent_triton, "linear_cross_entropy")
    if a.providers and not a.kinds:
        a.kinds = sorted({P.BY_NAME[n].kind for n in a.providers})
    a.kinds = a.kinds or (["ce", "linear"] if linear else ["ce"])
    return a


def main(argv: list[str]) -> None:
    interpret_without_cuda()  # first: before xent_triton is imported
    from perf import plots as plotting
    from perf import providers as P
    from perf import report
    from perf.rows import FIELDS

    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    provs = [p for p in P.select(args.providers, CUDA) if p.kind in args.kinds]
    meta = stamp(["-m", "perf.sweep", *argv])
    wanted = [n for n in (args.providers or P.BY_NAME) if P.BY_NAME[n].kind in args.kinds]
    missing = [n for n in wanted if n not in {p.name for p in provs}]
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | providers: "
          f"{', '.join(p.name for p in provs)}"
          + (f" | unavailable here: {', '.join(missing)}" if missing else ""),
          file=sys.stderr)
    base = {k: v for k, v in meta.items() if k != "command"}
    rows: list[dict] = []
    t0 = time.time()
    with open(os.path.join(args.out, "sweep.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()

        def write(row: dict) -> None:
            rows.append(row)
            w.writerow(row)
            fh.flush()

        (run_gpu if CUDA else run_cpu)(args, provs, base, write)
    meta.update(seconds=time.time() - t0, cpu_rows=args.cpu_rows, providers=[p.name for p in provs],
                missing=missing)
    md = report.markdown(rows, meta, CUDA)
    with open(os.path.join(args.out, "sweep.md"), "w") as fh:
        fh.write(md)
    pngs = plotting.plots(rows, args.out, CUDA)
    print(f"wrote {args.out}/sweep.csv, sweep.md, {', '.join(os.path.basename(x) for x in pngs)} "
          f"in {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
