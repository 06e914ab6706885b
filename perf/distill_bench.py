"""Distillation and token log-prob rows of the perf sweep, side by side with torch (CPU figures).

    python -m perf.distill_bench                 # N=16, C=32000, bf16 student and teacher
    python -m perf.distill_bench --rows 8 --classes 50257 --dtype fp32

Per case, forward + backward: the bytes moved (the traffic counter, ``perf/traffic.py``, Triton
kernels under the interpreter) and the peak extra memory (``perf/memory.py``), as multiples of the
student logits' bytes, for xent_triton and for torch's composition (``log_softmax`` of both models in
fp32 and explicit sums, the way users write it). Liger's JSD is not run: it needs CUDA.
Machine-independent figures; GPU timings belong to ``perf.sweep``.
"""
from __future__ import annotations

import argparse

from perf._env import interpret_without_cuda


def torch_distill(s, t, divergence, temperature=2.0, beta=0.5):
    import torch
    import torch.nn.functional as F
    lq = F.log_softmax(s.float() / temperature, -1)
    lp = F.log_softmax(t.float() / temperature, -1)
    if divergence == "kl":
        d = (lp.exp() * (lp - lq)).sum(-1)
    elif divergence == "reverse_kl":
        d = (lq.exp() * (lq - lp)).sum(-1)
    else:
        lm = torch.log(beta * lp.exp() + (1 - beta) * lq.exp())
        d = beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)
    return d.mean()


def torch_logprobs(x, tokens, temperature=1.0):
    import torch.nn.functional as F
    lq = F.log_softmax(x.float() / temperature, -1)
    return lq.gather(-1, tokens[:, None])[:, 0], -(lq.exp() * lq).sum(-1)


def measure(fn, traffic):
    """(bytes moved, peak extra bytes) of fn() (forward + backward), after one warm-up call."""
    from perf.memory import cpu_phase

    fn()
    peak, _, nbytes = cpu_phase(fn, traffic)
    return nbytes, peak


def main(argv=None) -> None:
    interpret_without_cuda()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--classes", type=int, default=32000)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    a = p.parse_args(argv)
    import torch

    import xent_triton
    from perf import traffic

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    N, C = a.rows, a.classes
    s = torch.randn(N, C).to(dt).requires_grad_(True)
    t = torch.randn(N, C).to(dt)
    tokens = torch.randint(0, C, (N,))
    logit_bytes = N * C * s.element_size()

    def step(loss_fn):
        def run():
            loss_fn().backward()
            s.grad = None
        return run

    cases = []
    for div in ("kl", "reverse_kl", "jsd"):
        cases.append((f"distill {div}", "xent_triton",
                      step(lambda d=div: xent_triton.distillation_loss(s, t, divergence=d, temperature=2.0))))
        cases.append((f"distill {div}", "torch", step(lambda d=div: torch_distill(s, t, d))))
    cases.append(("logprobs+entropy", "xent_triton", step(lambda: sum(
        o.sum() for o in xent_triton.token_logprobs(s, tokens, return_entropy=True)))))
    cases.append(("logprobs+entropy", "torch", step(lambda: sum(o.sum() for o in torch_logprobs(s, tokens)))))
    print(f"N={N} C={C} {a.dtype}; figures in multiples of the student logits' bytes ({logit_bytes} B)")
    print(f"| {'case':<18} | {'provider':<11} | bytes moved | peak extra memory |")
    print(f"|{'-' * 20}|{'-' * 13}|-------------|-------------------|")
    for case, provider, fn in cases:
        nbytes, peak = measure(fn, traffic)
        print(f"| {case:<18} | {provider:<11} | {nbytes / logit_bytes:10.2f}x "
              f"| {peak / logit_bytes:16.2f}x |")


if __name__ == "__main__":
    main()
