"""The main job: an LM-like batch through xent_triton and PyTorch, side by side.

    python -m perf.demo            # GPU when present, else the Triton interpreter on CPU
    python -m perf.demo --tokens 8192 --vocab 128256

Prints the loss of each implementation, the max error of loss and gradient against a float64
reference, and the peak extra memory of forward + backward (the logits' own bytes for scale).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from perf._env import interpret_without_cuda
from perf.measure import paired
from perf.memory import peak_extra_bytes

MiB = 2 ** 20


def _run(name, fn, x, y, device, grad_scale):
    x = x.detach().clone().requires_grad_()

    def step():
        loss = fn(x, y)
        loss.backward(torch.tensor(grad_scale, device=device, dtype=loss.dtype))
        return loss

    held = {}
    seconds = paired({name: lambda: held.update(loss=step())}, iters=1, warmup=0, device=device)[name][0]
    loss, grad = held["loss"], x.grad
    x.grad = None
    peak = peak_extra_bytes(step, device)
    return name, loss.detach(), grad, peak, seconds


def main() -> None:
    cuda = interpret_without_cuda()  # without CUDA: the Triton kernels on the CPU (before the import)
    import xent_triton

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192 if cuda else 256)
    p.add_argument("--vocab", type=int, default=128256 if cuda else 32000)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--label-smoothing", type=float, default=0.0)
    args = p.parse_args()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    N, C = args.tokens, args.vocab
    torch.manual_seed(0)
    # LM-like logits: a few strongly preferred tokens per row, 10% padding tokens ignored.
    x = (torch.randn(N, C, device=device) * 2.0).to(dtype)
    y = torch.randint(0, C, (N,), device=device)
    x[torch.arange(N, device=device), y] += 4.0
    y[torch.rand(N, device=device) < 0.1] = -100
    grad_scale = 1.0 / 3.0  # e.g. gradient accumulation over 3 micro-batches
    ls = args.label_smoothing

    where = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    print(f"device: {where} | torch {torch.__version__} | N={N} tokens, C={C} classes, {args.dtype}, "
          f"label_smoothing={ls}, upstream grad={grad_scale:.4f}")
    logit_bytes = N * C * x.element_size()
    print(f"logits: {logit_bytes / MiB:.1f} MiB")

    x64 = x.detach().double().requires_grad_()
    ref = F.cross_entropy(x64, y, label_smoothing=ls)
    ref.backward(torch.tensor(grad_scale, dtype=torch.float64, device=device))
    runs = [
        _run("xent_triton", lambda a, b: xent_triton.cross_entropy(a, b, label_smoothing=ls), x, y, device,
             grad_scale),
        _run("torch eager", lambda a, b: F.cross_entropy(a, b, label_smoothing=ls), x, y, device, grad_scale),
        _run("torch .float()", lambda a, b: F.cross_entropy(a.float(), b, label_smoothing=ls), x, y, device,
             grad_scale),
    ]
    print(f"{'implementation':<16}{'loss':>14}{'|loss err|':>12}{'max|grad err|':>15}{'peak extra MiB':>16}"
          f"{'x logits':>10}{'first step s':>14}")
    for name, loss, grad, peak, seconds in runs:
        lerr = abs(float(loss.double()) - float(ref.detach()))
        gerr = float((grad.double() - x64.grad).abs().max())
        print(f"{name:<16}{float(loss):>14.6f}{lerr:>12.2e}{gerr:>15.2e}{peak / MiB:>16.1f}"
              f"{peak / logit_bytes:>10.2f}{seconds:>14.3f}")
    print("(gradient reference: float64 PyTorch; max|grad| = %.2e)" % float(x64.grad.abs().max()))


if __name__ == "__main__":
    main()
