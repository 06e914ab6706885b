"""Vocabulary-parallel (tensor-parallel) ``token_logprobs`` (and the shared helpers of
``kl/parallel_distill.py``: ``distillation_loss``).

Each rank of ``process_group`` holds a contiguous class slice [start, start + C_local) of the
logits (student and teacher on the SAME layout); tokens / labels hold global class ids and are
the same on every rank. Every rank returns the full-vocabulary result; each rank gets the gradient
of its own shard.

Per call (R = rows = tokens), after the one layout/options ``all_gather`` of ``core.exchange``
(a few float64 per rank, one host sync; errors raised alike on every rank):

``token_logprobs``: local streaming forward (``logprobs_fwd_kernel``, or its torch twin) gives per
row (ref, log s, H) of the shard; ``all_reduce(MAX)`` of the shard maxima (R floats), then one
``all_reduce(SUM)`` of (s e^{ref - ref_g}, the owner's b_y - ref_g, and with the entropy
s e^{ref - ref_g} (E_r[b] - ref_g)): 2 or 3 R floats. The backward is local: the single-device
backward kernel fed the global (ref_g, log S) and H and a localized token (another shard's token
never matches a column). An ignored row (target == ``ignore_index``, agreed on in the exchange)
is localized to ``IGNORED`` on every rank: each shard's kernels skip it (no logit read), it returns
log-prob 0 / entropy 0 and gets a zero gradient row; the all-reduces keep their O(R) size.

``distillation_loss``: ``all_reduce(MAX)`` of the row maxima of teacher / T, student / T (and the
student at T = 1 when ce_weight > 0): 2-3 R floats; ``all_reduce(SUM)`` of the rescaled sums (and
the owner's label logit): 2-4 R floats; ``all_reduce(SUM)`` of the shard's divergence terms (1 R
float64; 3 R for jsd). The backward is local given those statistics (the per-row W / H of
reverse_kl / jsd included). Both run the single-device streaming kernels on the shard
(``kl/parallel_distill.py``): no N x C_local temporaries beside the gradient.

Never an N x C collective. Not checked: that tokens / labels and row counts agree across ranks
(gloo raises a size mismatch in the all-reduce; NCCL may hang). ``torch.compile``: runs eagerly.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.exchange import FOREIGN, IGNORED, VocabShard, exchange_device, localize_target, vocab_shard
from ..core.formulas_torch import transform_grad, transform_logits
from ..core.inputs import class_ids, target_range_check
from ..core.op_schema import input_grads
from ..core.runtime import alloc, compute_dtype, is_compiling, no_second_derivative, uses_triton
from . import rows_torch
from .ops import logprobs_backward_into, logprobs_forward_rows
from .options import KLOptions

NEG_INF = float("-inf")


def check_shard_logits(name: str, x: Tensor) -> None:
    """As ``functional.check_logits``, but a shard may hold no class (C_local = 0)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of shape (..., C_local)")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a class dimension (..., C_local), got a scalar")


def localize(ids: Tensor, shard: VocabShard, ignore_index: Optional[int] = None) -> Tensor:
    """Global ids -> shard-local ids, ``FOREIGN`` (-2) for another shard's (or an invalid) id;
    with ``ignore_index``, ``IGNORED`` (-1) for it (``core.exchange.localize_target``): the log-prob
    helpers below skip those rows."""
    if ignore_index is not None:
        return localize_target(ids, shard, ignore_index)
    local = ids - shard.start
    return torch.where((local >= 0) & (local < shard.size), local, torch.full_like(local, FOREIGN))


def owner_gather(z: Tensor, local: Tensor) -> Tensor:
    """z[r, local_r] where this shard owns the id, else 0 (R,)."""
    owned = local >= 0
    if z.shape[1] == 0:
        return torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    got = z.gather(1, torch.where(owned, local, torch.zeros_like(local))[:, None])[:, 0]
    return torch.where(owned, got, torch.zeros_like(got))


def global_ref(m_local: Tensor, group: Any) -> Tensor:
    """ref_g = the safe max over ranks of ``m_local`` (-inf: no class) by one all_reduce(MAX)."""
    m = m_local.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    return rows_torch.safe_ref(m)


# ------------------------------------------------------------------------------- token_logprobs


def logprobs_local(z: Tensor, loc: Tensor, temperature: float, entropy: bool,
                   scratch: bool = False, softcap: float = 0.0) -> Tensor:
    """Per row of a shard's logits z (R, C_local): (ref, log s, H or 0, b_y or 0) of b = cap(z) / T
    over this shard (one streaming pass: ``logprobs_forward_rows``), b_y the owned token's b; the
    softcap is elementwise, so each shard caps its own logits (0.0: none). ``scratch``: the torch
    path may overwrite z (the linear form's own chunk buffer). A row localized to ``IGNORED`` is
    skipped by the kernels (no logit read): (0, 0, 0, 0)."""
    R, C = z.shape
    cdt = compute_dtype(z)
    out = torch.zeros((R, 4), dtype=cdt, device=z.device)
    if C == 0:  # an empty shard contributes nothing: log s = -inf
        out[:, 1] = NEG_INF
        return out
    out[:, 3] = transform_logits(owner_gather(z, loc).to(cdt), 1.0, softcap) / temperature
    safe = torch.where(loc == IGNORED, loc, loc.clamp_min(0))  # FOREIGN -> any column: 0
    opts = KLOptions(temperature=temperature, return_entropy=entropy, softcap=softcap, ignore_index=IGNORED)
    _lp, ent, st = logprobs_forward_rows(z, safe, opts, scratch)
    out[:, :2] = st.to(cdt)
    if entropy:
        out[:, 2] = ent.to(cdt)
    return out


def logprobs_combine(local: Tensor, loc: Tensor, tokens: Tensor, n_classes: int, group: Any,
                     entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The full-vocabulary (log-probs, entropy or (0,), stats (ref_g, log S)) from every shard's
    ``logprobs_local`` rows: ``all_reduce(MAX)`` of R floats, ``all_reduce(SUM)`` of 2-3 R. A row
    localized to ``IGNORED`` (on every rank alike) comes out (0, 0, (0, 0)) as on one device."""
    ref_l, log_s_l, ent_l, b_y = local.unbind(1)
    live = log_s_l > NEG_INF
    ref_g = global_ref(torch.where(live, ref_l, torch.full_like(ref_l, NEG_INF)), group)
    w = torch.where(live, torch.exp(ref_l - ref_g + log_s_l), torch.zeros_like(ref_l))
    cols = [w, torch.where(loc >= 0, b_y - ref_g, torch.zeros_like(b_y))]
    if entropy:  # s_r e^{ref_r - ref_g} (E_r[b] - ref_g), E_r[b] - ref_r = log s_r - H_r
        cols.append(torch.where(live, w * (log_s_l - ent_l + ref_l - ref_g), torch.zeros_like(w)))
    pack = torch.stack(cols)
    dist.all_reduce(pack, op=dist.ReduceOp.SUM, group=group)
    log_S = torch.log(pack[0])
    lp = pack[1] - log_S
    lp = torch.where((tokens >= 0) & (tokens < n_classes), lp, torch.full_like(lp, float("nan")))
    ent = log_S - pack[2] / pack[0] if entropy else lp.new_empty((0,))
    stats = torch.stack([ref_g, log_S], dim=1)
    ignored = loc == IGNORED
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    lp, stats = torch.where(ignored, zero, lp), torch.where(ignored[:, None], zero, stats)
    return lp, torch.where(ignored, zero, ent) if entropy else ent, stats.contiguous()


def logprobs_shard_backward_into(out: Tensor, x2: Tensor, loc: Tensor, ent: Tensor, stats: Tensor,
                                 dlp: Optional[Tensor], dent: Optional[Tensor], temperature: float,
                                 softcap: float = 0.0) -> None:
    """dL/dx of a shard's logits x2 (R, C_local) into ``out`` (may be x2) from the global stats:
    the single-device backward kernel (a localized token never matches another shard's column),
    or torch ops on the rows (the torch path: R x C_local temporaries). A row localized to
    ``IGNORED`` gets zeros (the kernel reads none of its logits)."""
    R, C = x2.shape
    if C == 0 or R == 0:
        return
    if dlp is None:
        dlp = torch.zeros((), dtype=stats.dtype, device=x2.device).expand(R)
    T = temperature
    if uses_triton(x2):
        dlp32 = dlp.to(stats.dtype).contiguous()
        dent32 = dent.to(stats.dtype).contiguous() if dent is not None else None
        logprobs_backward_into(out, x2, loc, ent.contiguous(), stats, dlp32, dent32,
                               KLOptions(temperature=T, softcap=softcap, ignore_index=IGNORED))
        return
    xs = transform_logits(x2.to(stats.dtype), 1.0, softcap)
    logq = (xs / T - stats[:, :1]) - stats[:, 1:]
    q = torch.exp(logq)
    onehot = (torch.arange(C, device=x2.device)[None, :] == loc[:, None]).to(q.dtype)
    dx = dlp.to(q.dtype)[:, None] * (onehot - q)
    if dent is not None:
        dx = dx - dent.to(q.dtype)[:, None] * torch.where(q > 0, q * (logq + ent[:, None]),
                                                          torch.zeros_like(q))
    dx = transform_grad(dx / T, xs, 1.0, softcap)
    out.copy_(torch.where((loc == IGNORED)[:, None], torch.zeros((), dtype=dx.dtype, device=dx.device), dx))


class VocabParallelLogprobs(torch.autograd.Function):
    """forward: shard pass + MAX + SUM all-reduces (O(R)); backward: local."""

    @staticmethod
    def forward(ctx, x2: Tensor, tokens: Tensor, shard: VocabShard, group: Any, temperature: float,
                entropy: bool, softcap: float, ignore_index: int = -100):
        loc = localize(tokens, shard, ignore_index)
        local = logprobs_local(x2, loc, temperature, entropy, softcap=softcap)  # the kernel path reads x2
        lp, ent, stats = logprobs_combine(local, loc, tokens, shard.n_classes, group, entropy)
        ctx.save_for_backward(x2, loc, ent, stats)
        ctx.temperature, ctx.softcap = temperature, softcap
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    def backward(ctx, dlp, dent):
        x2, loc, ent, stats = ctx.saved_tensors
        out = alloc(x2.shape, x2.dtype, x2.device)
        logprobs_shard_backward_into(out, x2, loc, ent, stats, dlp, dent, ctx.temperature, ctx.softcap)
        return input_grads(ctx, no_second_derivative(out, "token_logprobs"))


def vocab_parallel_token_logprobs(logits: Tensor, tokens: Tensor, temperature: float, return_entropy: bool,
                                  process_group: Any, vocab_start_index: Optional[int] = None,
                                  extra_agree: Optional[dict] = None,
                                  options_error: Optional[BaseException] = None, softcap: float = 0.0,
                                  ignore_index: int = -100):
    """``token_logprobs`` over a class shard (``token_logprobs(..., process_group=)`` calls it).

    ``logits``: this rank's (..., C_local) slice; ``tokens``: GLOBAL ids. Returns the
    full-vocabulary log-probs (and entropy), identical on every rank; float32 (float64 for float64
    logits). Validation errors on any rank are raised on every rank after the layout exchange.
    ``temperature``: validated by the caller, which passes its error as ``options_error`` instead
    of raising (this rank's own validation error, raised after the exchange; the linear form's:
    the head's operands too); ``extra_agree``: more values that must agree across ranks;
    ``softcap``: validated by the caller (0.0: none), agreed on; ``ignore_index``: validated by the
    caller, agreed on (its rows return 0, 0 and get no gradient on every rank).
    """
    args = (logits, tokens, temperature, return_entropy, process_group, vocab_start_index, extra_agree or {},
            options_error, softcap, ignore_index)
    if is_compiling():
        return torch.compiler.disable(_token_logprobs)(*args)
    return _token_logprobs(*args)


def _token_logprobs(logits, tokens, temperature, return_entropy, process_group, vocab_start_index,
                    extra_agree, options_error, softcap, ignore_index):
    local_error, tok, C_local = options_error, None, 0
    try:
        check_shard_logits("input", logits)
        C_local = logits.shape[-1]
        tok = class_ids(tokens, logits.shape[:-1], "input's leading shape")
    except (TypeError, ValueError, IndexError) as e:  # raised after the exchange: no rank hangs
        local_error = local_error or e
    agree = dict(temperature=temperature if local_error is None else 0.0,
                 return_entropy=float(bool(return_entropy)), softcap=softcap if local_error is None else 0.0,
                 ignore_index=ignore_index if local_error is None else 0, **extra_agree)
    shard = vocab_shard(process_group, C_local, exchange_device(process_group, logits), vocab_start_index,
                        agree, "vocab-parallel token_logprobs", True, local_error)
    target_range_check(tok, shard.n_classes, ignore_index)
    lp, ent = VocabParallelLogprobs.apply(logits.reshape(tok.numel(), C_local), tok, shard, process_group,
                                          temperature, bool(return_entropy), softcap, ignore_index)
    shape = logits.shape[:-1]
    return (lp.view(shape), ent.view(shape)) if return_entropy else lp.view(shape)
