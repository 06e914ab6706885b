"""Shared pieces of the KL linear forms' compaction tests (tests/kl/test_kl_linear_compaction*.py):
inputs with a fraction of ignored tokens at random positions, the float64 torch references, and
the GEMM FLOPs the chunked ops do per token (``kl/linear_ops.py``, ``kl/parallel_linear.py``).

FLOPs per kept token (D, Dt the student / teacher hidden sizes, C the classes of the head or of
this rank's shard), counted from the code, forward + backward:
  linear_token_logprobs    forward logits 2 D C; backward recomputes them 2 D C, dX 2 D C, dW 2 D C
                           = 8 D C (6 D C with a frozen head, no dW)
  linear_distillation_loss student as above, 8 D C (6 with a frozen head); the teacher's logits are
                           formed in forward AND recomputed in backward: 4 Dt C (not 2 Dt C)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def flops_per_token(fn: str, D: int, Dt: int, C: int, need_dw: bool = True, need_dx: bool = True) -> int:
    """GEMM FLOPs per kept token of forward + backward (module docstring)."""
    student = 2 * D * C * (2 + int(need_dx) + int(need_dw))
    return student + (4 * Dt * C if fn == "distill" else 0)


def ignored_ids(N: int, C: int, frac: float, ignore_index: int, seed: int) -> Tensor:
    """N class ids in [0, C) (never ``ignore_index``), round(frac N) of them at random positions set
    to ``ignore_index``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, C, (N,), generator=gen)
    if 0 <= ignore_index < C:  # a class id used as the ignore id: no valid token carries it
        ids = torch.where(ids == ignore_index, (ids + 1) % C, ids)
    ids[torch.randperm(N, generator=gen)[:round(frac * N)]] = ignore_index
    return ids


def heads(N: int, D: int, Dt: int, C: int, dtype: torch.dtype, seed: int) -> dict:
    """Student (h, w, b) and teacher (ht, wt, bt): random, logits of order 1-3."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(h=r(N, D).to(dtype), w=(r(C, D) / D ** 0.5 * 2).to(dtype), b=(r(C) * 0.5).to(dtype),
                ht=r(N, Dt).to(dtype), wt=(r(C, Dt) / Dt ** 0.5 * 2).to(dtype), bt=(r(C) * 0.5).to(dtype))


def ref_distill_rows(zs: Tensor, zt: Tensor, labels: Optional[Tensor], divergence: str, beta: float,
                     T: float, ce_weight: float, ignore_index: int) -> Tensor:
    """Per-token distillation loss of student / teacher logits by torch ops (0 on ignored labels)."""
    lq, lp = F.log_softmax(zs / T, -1), F.log_softmax(zt.to(zs.dtype) / T, -1)
    p, q = lp.exp(), lq.exp()
    if divergence == "kl":
        d = (p * (lp - lq)).sum(-1)
    elif divergence == "reverse_kl":
        d = (q * (lq - lp)).sum(-1)
    else:
        lm = torch.log(beta * p + (1 - beta) * q)
        d = beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)
    if labels is None:
        return d
    ok = labels != ignore_index
    if ce_weight:
        ce = F.cross_entropy(zs, torch.where(ok, labels, 0), reduction="none")
        d = ce_weight * ce + (1 - ce_weight) * d
    return torch.where(ok, d, torch.zeros_like(d))


def ref_logprobs(z: Tensor, tokens: Tensor, T: float, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(log-probs, entropy) of logits z at temperature T by torch ops (0 on ignored tokens)."""
    lq = F.log_softmax(z / T, -1)
    ok = tokens != ignore_index
    lp = lq.gather(-1, torch.where(ok, tokens, 0)[:, None])[:, 0]
    ent = -(lq.exp() * lq).sum(-1)
    zero = torch.zeros_like(lp)
    return torch.where(ok, lp, zero), torch.where(ok, ent, zero)
