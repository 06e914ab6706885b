"""TRL 1.16's fused LM head vs xent's (``xhf.add_fused_lm_head``): peak memory and time side by side.

    python -m perf.trl_head                         # GRPO's fields, CPU (both heads' pure-torch paths)
    python -m perf.trl_head --sft                   # SFTTrainer's fields (log_probs, entropy, is_top1)
    python -m perf.trl_head --tokens 8192 --vocab 151936 --hidden 2048 --dtype bfloat16   # GPU
    python -m perf.trl_head --autocast-error        # both heads vs float64 under bf16 autocast

Forward and backward of the per-token fields a trainer asks for, of ``tokens`` hidden states through a
(V, D) head, for TRL's ``ChunkedLogProbFunction`` (with TRL's own chunk size) and for xent's
``per_token``. GRPO (default): log-probs and entropy, loss ``-(log_probs).sum() - 0.01 * entropy.sum()``.
``--sft``: log-probs, entropy and is_top1 (token accuracy), loss ``-log_probs.sum() / N`` (SFTTrainer's
nll; the entropy and is_top1 only logged). Prints the peak memory above the inputs (CUDA allocator, or
CPU profiler memory events), the median time of one step over ``--repeat`` steps run paired and
interleaved (``perf.measure.paired``, after one warm-up step of each), the logits GEMM passes of each
forward, and the largest differences.
"""
from __future__ import annotations

import argparse
import statistics
from unittest import mock

import torch

MiB = 2 ** 20


def forward_passes(fn, N: int, C: int) -> float:
    """(rows of the ``torch.mm`` / ``torch.addmm`` outputs with C columns that ``fn()`` forms) / N."""
    rows = [0]

    def wrap(f):
        def counted(*a, **k):
            out = f(*a, **k)
            if out.dim() == 2 and out.shape[-1] == C:
                rows[0] += out.shape[0]
            return out
        return counted

    mm, addmm = wrap(torch.mm), wrap(torch.addmm)
    with mock.patch.object(torch, "mm", mm), mock.patch.object(torch, "addmm", addmm), torch.no_grad():
        fn()
    return rows[0] / N


def autocast_error(tokens: int = 56, hidden: int = 64, vocab: int = 2000) -> None:
    """SFT's loss under bf16 autocast (SFTConfig's default), fp32 leaves as in a trainer: each head's
    gradient-norm and dW error against float64 on the bf16-rounded operands both heads multiply."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from xent_triton.integrations.hf_common import head_operands
    from xent_triton.integrations.hf_trl import per_token

    torch.manual_seed(0)
    h0, w0 = torch.randn(tokens, hidden), torch.randn(vocab, hidden) * 0.16
    y = torch.randint(0, vocab, (tokens,))
    outputs = ("log_probs", "entropy", "is_top1")
    hr, wr = h0.bfloat16().double().requires_grad_(), w0.bfloat16().double().requires_grad_()
    (-torch.log_softmax(hr @ wr.T, -1).gather(1, y[:, None]).sum() / tokens).backward()
    ref_norm = torch.cat([hr.grad.flatten(), wr.grad.flatten()]).norm()
    for name in ("TRL 1.16 ChunkedLogProbFunction", "xent per_token"):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if name.startswith("TRL"):
                lp = ChunkedLogProbFunction.apply(h, w, None, y, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                                  outputs)[0]
            else:
                hh, ww, _, ctx = head_operands(h, w, None, like_hidden=True)
                with ctx:
                    lp = per_token(hh, ww, None, y, 1.0, None, 1.0, outputs)[0]
        (-lp.sum() / tokens).backward()
        norm = torch.cat([h.grad.double().flatten(), w.grad.double().flatten()]).norm()
        dw = (w.grad.double() - wr.grad).abs().max() / wr.grad.abs().max()
        print(f"{name:34} grad-norm relative error {float(abs(norm - ref_norm) / ref_norm):.2e}   "
              f"dW max relative error {float(dw):.2e}")


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096 if cuda else 2048)
    p.add_argument("--hidden", type=int, default=1024 if cuda else 128)
    p.add_argument("--vocab", type=int, default=151936 if cuda else 32000)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--sft", action="store_true", help="SFTTrainer's fields (log_probs, entropy, is_top1)")
    p.add_argument("--autocast-error", action="store_true", help="both heads vs float64 under bf16 autocast")
    args = p.parse_args()
    if args.autocast_error:
        return autocast_error()
    device, dtype = ("cuda" if cuda else "cpu"), getattr(torch, args.dtype)

    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from perf.measure import paired
    from perf.memory import peak_extra_bytes
    from xent_triton.integrations.hf_trl import per_token

    torch.manual_seed(0)
    N = args.tokens
    h0 = torch.randn(N, args.hidden, device=device).to(dtype)
    w0 = (torch.randn(args.vocab, args.hidden, device=device) / args.hidden ** 0.5).to(dtype)
    y = torch.randint(0, args.vocab, (N,), device=device)
    outputs = ("log_probs", "entropy", "is_top1") if args.sft else ("log_probs", "entropy")

    def trl_head(h, w):
        lp, ent, _, _, top1 = ChunkedLogProbFunction.apply(h, w, None, y, args.temperature,
                                                           _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs)
        return lp, ent, top1

    def xent_head(h, w):
        lp, ent, _, _, top1 = per_token(h, w, None, y, args.temperature, None, 1.0, outputs)
        return lp, ent, top1

    def loss(lp, ent):
        return -lp.sum() / N if args.sft else -(lp.sum()) - 0.01 * ent.sum()

    heads = {"TRL 1.16 ChunkedLogProbFunction": trl_head, "xent per_token": xent_head}
    leaves = {name: (h0.clone().requires_grad_(), w0.clone().requires_grad_()) for name in heads}

    def step(name):
        h, w = leaves[name]
        lp, ent, top1 = heads[name](h, w)
        loss(lp, ent).backward()
        return lp.detach(), ent.detach(), top1

    def timed(name):
        def run():
            leaves[name][0].grad = leaves[name][1].grad = None
            step(name)
        return run

    # paired: every iteration runs both heads, the order rotated (both see the same machine state)
    times = paired({name: timed(name) for name in heads}, args.repeat, warmup=1, device=device)
    results = {}
    for name, head in heads.items():
        h, w = leaves[name]
        h.grad = w.grad = None
        lp, ent, top1 = step(name)
        grads = (h.grad.float(), w.grad.float())
        h.grad = w.grad = None
        peak = peak_extra_bytes(lambda: step(name), device)
        passes = forward_passes(lambda: head(h, w), N, args.vocab)
        results[name] = (peak, statistics.median(times[name]), passes, lp.float(), ent.float(), top1, grads)

    logits = N * args.vocab * 4
    print(f"{'SFT' if args.sft else 'GRPO'} fields {outputs}: {N} tokens x hidden {args.hidden} x vocabulary "
          f"{args.vocab}, {args.dtype}, on {device}; float32 logits would be {logits / MiB:.1f} MiB")
    print(f"{'head':34}{'peak extra memory':>20}{'fwd+bwd median':>17}{'fwd GEMM passes':>17}"
          f"   (median of {args.repeat} paired)")
    for name, (peak, seconds, passes, *_) in results.items():
        print(f"{name:34}{peak / MiB:16.1f} MiB{seconds * 1e3:14.1f} ms{passes:17.2f}")
    (_, _, _, lp_a, ent_a, top_a, g_a), (_, _, _, lp_b, ent_b, top_b, g_b) = results.values()
    err = [(lp_a - lp_b).abs().max(), (ent_a - ent_b).abs().max(),
           *((a - b).abs().max() for a, b in zip(g_a, g_b))]
    print("max |difference| log_probs {:.2e}  entropy {:.2e}  grad hidden {:.2e}  grad weight {:.2e}".format(
        *(float(e) for e in err)))
    if args.sft:
        print(f"is_top1 disagreements: {int((top_a != top_b).sum())} of {N} "
              f"(TRL {int(top_a.sum())} top-1, xent {int(top_b.sum())})")


if __name__ == "__main__":
    main()
