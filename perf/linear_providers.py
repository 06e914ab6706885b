"""Linear cross-entropy providers side by side, in one run (CPU): FLOPs counted (aten GEMMs +
tl.dot) and bytes moved (``perf/traffic.py``, Triton kernels under the interpreter), peak extra
memory (``perf/memory.py``), and plain-CPU wall time (torch ops, no interpreter; the providers
timed paired and interleaved by ``perf.measure.paired``, min of ``--repeats``) as ratios to torch
eager.

Providers: torch eager (``F.linear`` + ``F.cross_entropy``), torch's ``F.linear_cross_entropy``
(torch >= 2.13; default options), Liger's fused linear cross-entropy (Triton; runs under the
interpreter here, not on plain CPU tensors), Apple's Cut Cross-Entropy (its Triton ``cce`` kernels
fail under the interpreter: reported; its ``torch_compile`` implementation runs on plain CPU),
xent_triton default, xent_triton with a small ``chunk_size``.

Run: ``python -m perf.linear_providers [--rows 256 --hidden 64 --classes 4096]``.
"""
from __future__ import annotations

import argparse
import os
import sys


def providers(chunk: int):
    import torch.nn.functional as F

    import xent_triton

    out = {"torch eager": lambda h, w, y: F.cross_entropy(F.linear(h, w), y)}
    if hasattr(F, "linear_cross_entropy"):
        out["torch F.linear_cross_entropy"] = lambda h, w, y: F.linear_cross_entropy(h, w, y)
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        out["liger FLCE"] = lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y)
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["CCE cce (Triton)"] = lambda h, w, y: cce(h, w, y, impl="cce")
        out["CCE torch_compile"] = lambda h, w, y: cce(h, w, y, impl="torch_compile")
    except ImportError:
        pass
    out["xent default"] = lambda h, w, y: xent_triton.linear_cross_entropy(h, w, y)
    out[f"xent chunk_size={chunk}"] = lambda h, w, y: xent_triton.linear_cross_entropy(
        h, w, y, chunk_size=chunk)
    return out


def counted(fn, h, w, y) -> dict:
    """FLOPs, bytes and peak extra memory of forward + backward under the interpreter."""
    from perf import traffic
    from perf.memory import peak_extra_bytes

    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with traffic.count() as r:
        fn(hh, ww, y).backward()
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    peak = peak_extra_bytes(lambda: fn(hh, ww, y).backward(), "cpu")
    return dict(flops=r["flops"], bytes=r["bytes"], peak=peak)


def step(fn, h, w, y):
    """One forward + backward of ``fn`` on leaves that are copies of h, w (gradients dropped after)."""
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

    def run():
        fn(hh, ww, y).backward()
        hh.grad = ww.grad = None
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--classes", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--wall-rows", type=int, default=2048)
    p.add_argument("--wall-hidden", type=int, default=512)
    p.add_argument("--wall-classes", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3, help="paired rounds of the plain-CPU timing")
    p.add_argument("--csv", help="also write the rows, stamped, to this CSV file")
    a = p.parse_args()
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (main() runs first)
    import torch

    from perf.measure import paired

    torch.manual_seed(0)
    N, D, C = a.rows, a.hidden, a.classes
    h = torch.randn(N, D, dtype=torch.bfloat16)
    w = (torch.randn(C, D) / D ** 0.5).to(torch.bfloat16)
    y = torch.randint(0, C, (N,))
    base = 2 * N * D * C
    print(f"interpreter, bf16, N={N} D={D} C={C}: FLOPs / 2NDC, bytes / logits bytes, peak / logits bytes")
    logits_bytes = N * C * 2
    rows, table = {}, []
    for name, fn in providers(a.chunk).items():
        if name == "CCE torch_compile":  # dynamo skips frames under the counter's dispatch mode, for good
            print(f"  {name:32s} not counted: torch.compile under the counter (timed below)")
            continue
        try:
            c = counted(fn, h, w, y)
        except Exception as e:  # a provider that cannot run here is reported, not hidden
            print(f"  {name:32s} failed: {type(e).__name__}: {str(e)[:80]}")
            continue
        rows[name] = c
        table.append(dict(kind="interpreter", provider=name, dtype="bfloat16", N=N, D=D, C=C,
                          flops_x_2NDC=f"{c['flops'] / base:.4f}",
                          bytes_x_logits=f"{c['bytes'] / logits_bytes:.3f}",
                          peak_x_logits=f"{c['peak'] / logits_bytes:.3f}", seconds="", time_x=""))
        print(f"  {name:32s} FLOPs {c['flops'] / base:5.2f}x  bytes {c['bytes'] / logits_bytes:6.2f}x  "
              f"peak {c['peak'] / logits_bytes:5.2f}x")

    os.environ["TRITON_INTERPRET"] = "0"  # plain CPU: torch ops (xent's CPU path), no interpreter
    N, D, C = a.wall_rows, a.wall_hidden, a.wall_classes
    for dt in (torch.float32, torch.bfloat16):
        h = torch.randn(N, D).to(dt)
        w = (torch.randn(C, D) / D ** 0.5).to(dt)
        y = torch.randint(0, C, (N,))
        steps = {}
        for name, fn in providers(a.chunk).items():
            if name.startswith("liger") or name == "CCE cce (Triton)":
                continue  # Triton on CPU tensors needs the interpreter
            try:
                steps[name] = step(fn, h, w, y)
                steps[name]()  # warm (compiles); paired() warms once more
            except Exception as e:  # reported, not hidden
                steps.pop(name, None)
                print(f"  {name:32s} failed: {type(e).__name__}: {str(e)[:80]}")
        times = {name: min(ts) for name, ts in paired(steps, a.repeats).items()}
        ref = times["torch eager"]
        print(f"plain CPU, {dt}, N={N} D={D} C={C}: forward+backward seconds (min of {a.repeats}, paired), "
              "ratio to torch eager")
        for name, t in times.items():
            print(f"  {name:32s} {t:8.3f} s  {t / ref:5.2f}x")
            table.append(dict(kind="plain CPU", provider=name, dtype=str(dt).split(".")[-1], N=N, D=D, C=C,
                              flops_x_2NDC="", bytes_x_logits="", peak_x_logits="", seconds=f"{t:.4f}",
                              time_x=f"{t / ref:.3f}"))
    if a.csv:
        from perf._env import cpu_name, run_stamp, write_csv

        write_csv(a.csv, table, run_stamp(["-m", "perf.linear_providers", *sys.argv[1:]], cpu_name()))


if __name__ == "__main__":
    main()
