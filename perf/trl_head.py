"""TRL 1.16's fused LM head vs xent's (``xhf.add_fused_lm_head``): peak memory and time side by side.

    python -m perf.trl_head                         # CPU (both heads' pure-torch paths)
    python -m perf.trl_head --tokens 8192 --vocab 151936 --hidden 2048 --dtype bfloat16   # GPU

Forward and backward of the per-token log-probs and entropy (what GRPO asks for: the loss is
``-(log_probs).sum() - 0.01 * entropy.sum()``) of ``tokens`` hidden states through a (V, D) head, for
TRL's ``ChunkedLogProbFunction`` and for xent's ``per_token`` (``xent_triton.linear_token_logprobs``).
Prints the peak memory above the inputs (CUDA allocator, or CPU profiler memory events), the time of
one step (the median of ``--repeat``), and the largest difference of the outputs and gradients.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

MiB = 2 ** 20


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096 if cuda else 2048)
    p.add_argument("--hidden", type=int, default=1024 if cuda else 128)
    p.add_argument("--vocab", type=int, default=151936 if cuda else 32000)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    device, dtype = ("cuda" if cuda else "cpu"), getattr(torch, args.dtype)

    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    from perf.memory import peak_extra_bytes
    from xent_triton.integrations.hf_trl import per_token

    torch.manual_seed(0)
    h0 = torch.randn(args.tokens, args.hidden, device=device).to(dtype)
    w0 = (torch.randn(args.vocab, args.hidden, device=device) / args.hidden ** 0.5).to(dtype)
    y = torch.randint(0, args.vocab, (args.tokens,), device=device)
    outputs = ("log_probs", "entropy")

    def trl_head(h, w):
        lp, ent, *_ = ChunkedLogProbFunction.apply(h, w, None, y, args.temperature, 32768, None, 1.0, outputs)
        return lp, ent

    def xent_head(h, w):
        lp, ent, *_ = per_token(h, w, None, y, args.temperature, None, 1.0, outputs)
        return lp, ent

    results = {}
    for name, head in (("TRL 1.16 ChunkedLogProbFunction", trl_head), ("xent per_token", xent_head)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()

        def step():
            lp, ent = head(h, w)
            (-(lp.sum()) - 0.01 * ent.sum()).backward()
            return lp.detach(), ent.detach()

        times = []
        for _ in range(args.repeat):
            h.grad = w.grad = None
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            lp, ent = step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        grads = (h.grad.float(), w.grad.float())
        h.grad = w.grad = None
        peak = peak_extra_bytes(step, device)
        results[name] = (peak, statistics.median(times), lp.float(), ent.float(), grads)

    logits = args.tokens * args.vocab * 4
    print(f"{args.tokens} tokens x hidden {args.hidden} x vocabulary {args.vocab}, {args.dtype}, "
          f"on {device}; "
          f"float32 logits would be {logits / MiB:.1f} MiB")
    print(f"{'head':34}{'peak extra memory':>20}{'fwd+bwd time':>15}")
    for name, (peak, seconds, *_) in results.items():
        print(f"{name:34}{peak / MiB:16.1f} MiB{seconds * 1e3:12.1f} ms")
    (_, _, lp_a, ent_a, g_a), (_, _, lp_b, ent_b, g_b) = results.values()
    err = [(lp_a - lp_b).abs().max(), (ent_a - ent_b).abs().max(),
           *((a - b).abs().max() for a, b in zip(g_a, g_b))]
    print("max |difference| log_probs {:.2e}  entropy {:.2e}  grad hidden {:.2e}  grad weight {:.2e}".format(
        *(float(e) for e in err)))


if __name__ == "__main__":
    main()
