"""The plain-CPU GEMMs of the linear head in each dtype, side by side: ``python -m perf.cpu_gemm``.

Times (min of ``--repeats``, interleaved) the three GEMM shapes of a token chunk (logits
X Wᵀ, dX = dZ W, dW = dZᵀ X) at the ``perf.cpu_speed`` lin-ign shape (1024 kept rows, D = 512,
C = 32000) in bf16, fp16 and fp32 (torch.mm), and the fp32-on-upcast-blocks form the head takes
for 16-bit operands where the CPU has no AMX (``xent_triton.linear.cpu_gemm.mm_fp32``); prints the
CPU's AMX flags as torch reports them (``cpu_gemm.has_amx``).
"""
from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--c", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    import torch

    from xent_triton.linear import cpu_gemm

    n, d, c = args.rows, args.d, args.c
    g = torch.Generator().manual_seed(0)
    x32, w32, dz32 = (torch.randn(*s, generator=g) for s in ((n, d), (c, d), (n, c)))
    cases = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        x, w, dz = x32.to(dt), w32.to(dt), dz32.to(dt)
        z, dx, dw = torch.empty(n, c, dtype=dt), torch.empty(n, d, dtype=dt), torch.empty(c, d, dtype=dt)
        cases[name] = (lambda x=x, w=w, dz=dz, z=z, dx=dx, dw=dw: (
            torch.mm(x, w.t(), out=z), torch.mm(dz, w, out=dx), torch.mm(dz.t(), x, out=dw)))
    xb, wb, dzb = x32.bfloat16(), w32.bfloat16(), dz32.bfloat16()
    zb, dxb, dwb = torch.empty(n, c, dtype=torch.bfloat16), torch.empty(n, d, dtype=torch.bfloat16), \
        torch.empty(c, d, dtype=torch.bfloat16)
    cases["bf16 via fp32 blocks"] = lambda: (cpu_gemm.mm_fp32(zb, xb, wb.t()), cpu_gemm.mm_fp32(dxb, dzb, wb),
                                             cpu_gemm.mm_fp32(dwb, dzb.t(), xb))
    best = {k: float("inf") for k in cases}
    for _ in range(args.repeats):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, AMX bf16 "
          f"{cpu_gemm.has_amx(torch.bfloat16)}, AMX fp16 {cpu_gemm.has_amx(torch.float16)}; "
          f"three GEMMs of ({n} x {d}) x ({d} x {c}), min of {args.repeats}")
    for k, t in best.items():
        print(f"{k:22} {t:8.3f} s   {6 * n * d * c / t / 1e9:7.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
