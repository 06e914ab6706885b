"""Eager overhead of the one door (the ``xent_triton::cross_entropy_fwd`` custom op with registered
autograd) against a plain ``torch.autograd.Function`` around the same launchers, per call on CPU.

Run: ``python -m perf.door_overhead`` (CPU tensors on the torch fallback, tiny shapes, so the
difference is the dispatch cost itself). Prints microseconds per forward + backward call.
"""
from __future__ import annotations

import time

import torch


def main(repeat: int = 2000) -> None:
    from xent_triton.core.options import LossOptions
    from xent_triton.cross_entropy import ops

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, t, opts):
            loss, lse, stats, _, _ = ops.forward_rows(x, t, None, opts)
            ctx.save_for_backward(x, t, stats)
            ctx.opts = opts
            return loss

        @staticmethod
        def backward(ctx, g):
            x, t, stats = ctx.saved_tensors
            out = torch.empty_like(x)
            ops.backward_into(out, x, t, None, stats, g, None, ctx.opts)
            return out, None, None

    opts = LossOptions()
    x = torch.randn(4, 16, 1, requires_grad=True)
    t = torch.randint(0, 16, (4,))

    def door():
        ops.cross_entropy_rows(x, t, None, opts)[0].sum().backward()

    def function():
        Function.apply(x, t, opts).sum().backward()

    results = {}
    for name, fn in (("custom op (the one door)", door), ("autograd.Function", function)):
        for _ in range(200):
            fn()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(repeat):
                fn()
            best = min(best, (time.perf_counter() - t0) / repeat)
        results[name] = best * 1e6
    for name, us in results.items():
        print(f"{name:28s} {us:8.1f} us per forward+backward call")
    a, b = results.values()
    print(f"difference: {a - b:+.1f} us per call")


if __name__ == "__main__":
    main()
