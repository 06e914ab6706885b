"""Public functions of the KL family: ``distillation_loss`` and ``token_logprobs``.

Both take logits over the last dimension, ``(..., C)``, as language models produce them, and run
one streaming forward and one recomputing backward kernel (``kl/distill_kernels.py``,
``kl/logprobs_kernels.py``); nothing N x C is materialised besides the gradient.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union, overload

import torch
from torch import Tensor

from ..core.dtensor import is_dtensor, placement_layout_error
from ..core.inputs import class_ids
from ..core.reduction import finish_sums, row_sums
from ..core.renames import renamed_keywords
from .dtensor import dtensor_distillation_loss, dtensor_token_logprobs
from .names import LOGITS, LOGPROBS
from .ops import distillation_rows, token_logprobs_rows
from .options import KLOptions, make_kl
from .parallel import vocab_parallel_token_logprobs
from .parallel_distill import vocab_parallel_distillation_rows
from .weights import agree_token_weight, check_token_weight, parallel_token_weight, weighted, weighted_outputs


def check_logits(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of shape (..., C)")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a class dimension (..., C), got a scalar")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has no classes (C = 0)")


def deferred_kl(**kwargs) -> tuple[Optional[KLOptions], Optional[BaseException]]:
    """``make_kl(**kwargs)`` for the vocabulary-parallel paths: (options, None), or (None, its error)
    to be raised on every rank after the exchange."""
    try:
        return make_kl(**kwargs), None
    except (TypeError, ValueError) as e:
        return None, e


def reduce_tokens(loss_rows: Tensor, target: Optional[Tensor], opts: KLOptions, shape,
                  token_weight: Optional[Tensor] = None) -> Tensor:
    """none: the tokens' shape; sum; mean over the non-ignored tokens (all without a target).
    ``token_weight`` (R,) multiplies each token's loss and, for mean, its share of the denominator
    (sum of the weights of the non-ignored tokens), as the CE heads' ``reduce_rows``.
    ``empty_batch="zero"``: a mean over no token is 0 (zero gradients, graph connected), else NaN."""
    if opts.reduction == "none":
        rows = loss_rows if token_weight is None else loss_rows * token_weight.to(loss_rows.dtype)
        return rows.view(shape)
    valid = torch.ones_like(loss_rows, dtype=torch.bool) if target is None else target != opts.ignore_index
    return finish_sums(row_sums(loss_rows, valid.to(loss_rows.dtype), valid, None, opts, token_weight), opts)


@renamed_keywords(**LOGITS)
def distillation_loss(input: Tensor, teacher_input: Tensor, target: Optional[Tensor] = None, *,
                      divergence: str = "kl", beta: float = 0.5, temperature: float = 1.0,
                      ignore_index: int = -100, reduction: str = "mean", ce_weight: float = 0.0,
                      empty_batch: str = "nan", softcap: Optional[float] = None,
                      token_weight: Optional[Tensor] = None, process_group: Optional[Any] = None,
                      vocab_start_index: Optional[int] = None) -> Tensor:
    """Knowledge-distillation loss between student and teacher logits, fused and streamed.

    With p = softmax(cap(teacher) / T) and q = softmax(cap(input) / T) over the last dimension
    (cap(z) = softcap tanh(z / softcap), the identity without a softcap): ``"kl"`` = KL(p || q),
    ``"reverse_kl"`` = KL(q || p), ``"jsd"`` = beta KL(p || m) + (1 - beta) KL(q || m) with
    m = beta p + (1 - beta) q. 0 log 0 := 0 (padded -inf logits are fine without a softcap). No
    T**2 factor is applied: multiply the loss by T**2 yourself if you want Hinton's scaling. Per
    token: ce_weight * CE(cap(input) at T = 1, target) + (1 - ce_weight) * divergence.

    Args:
        input: the student's (..., C) logits, float16 / bfloat16 / float32 (float64 runs the
            torch path).
        teacher_input: (..., C), any float dtype (e.g. fp32 with a bf16 student). Treated as a
            constant: it gets no gradient (detached), even if it requires grad.
        target: optional class ids of shape ``input.shape[:-1]``; tokens whose id is
            ``ignore_index`` are left out of every term (loss 0, gradient 0).
        divergence: "kl", "reverse_kl" or "jsd". beta: the JSD mixture weight, in (0, 1).
        temperature: T > 0, finite; divides the (capped) logits (the CE heads' ``logit_scale``
            multiplies: logit_scale = 1 / T). ce_weight: alpha in [0, 1] (needs target when > 0).
        ignore_index: an int (None: -100, as the CE heads; a bool or float raises TypeError).
        reduction: "none" (the tokens' shape), "sum", or "mean" (over non-ignored tokens; over all
            tokens when ``target`` is None).
        empty_batch: "nan" (a mean over no valid token, as torch) or "zero" (0, zero gradients).
        softcap: None or a positive float: both models' logits are capped, z -> softcap
            tanh(z / softcap), BEFORE the temperature (Gemma's order: cap(z) / T), the same cap.
        token_weight: optional float weights of the target's shape (``input.shape[:-1]``): each
            token's loss is multiplied by its weight, and ``mean`` divides by the sum of the
            weights of the non-ignored tokens (as the CE heads).
        process_group: vocabulary parallelism (``kl/parallel_distill.py``): both logits are this
            rank's class slice on the same layout, ``target`` global ids; every rank returns the
            full-vocabulary loss. vocab_start_index: this rank's first class (None: rank order).
            ``softcap`` caps each shard's logits; ``token_weight`` (the same on every rank, of
            the target's shape) weighs the per-token losses; both agreed on by every rank.

    Returns:
        The float32 loss (float64 for a float64 student). The gradient reaches the student only.
        Target ids outside [0, C) that are not ``ignore_index`` raise IndexError on CPU; on CUDA
        they make that token's loss NaN.

    Example:
        >>> s = torch.randn(4, 7, 32000, dtype=torch.bfloat16, requires_grad=True)
        >>> t = torch.randn(4, 7, 32000)
        >>> distillation_loss(s, t, divergence="jsd", temperature=2.0, softcap=30.0).backward()
    """
    options: dict[str, Any] = dict(
                   divergence=divergence, beta=beta, temperature=temperature, ce_weight=ce_weight,
                   has_target=target is not None, ignore_index=ignore_index, reduction=reduction,
                   empty_batch=empty_batch, softcap=softcap, has_token_weight=token_weight is not None)
    if is_dtensor(input) or process_group is not None or vocab_start_index is not None:
        opts, error = deferred_kl(**options)  # a rank's error is raised after the exchange, on every rank
        if is_dtensor(input):  # the layout comes from the placements (kl/dtensor.py)
            error = error or placement_layout_error(process_group, vocab_start_index, "distillation_loss")
            return dtensor_distillation_loss(input, teacher_input, target, opts, error, token_weight)
        tw, error = parallel_token_weight(token_weight, input, error)
        rows, lbl = vocab_parallel_distillation_rows(input, teacher_input, target, opts,
                                                     process_group, vocab_start_index, None, error)
        assert opts is not None  # else the call above raised the error, on every rank
        return reduce_tokens(rows, lbl, opts, input.shape[:-1], tw)
    check_logits("input", input)
    check_logits("teacher_input", teacher_input)
    if teacher_input.shape != input.shape:
        raise ValueError(f"teacher_input shape {tuple(teacher_input.shape)} != input shape "
                         f"{tuple(input.shape)}")
    if teacher_input.device != input.device:
        raise ValueError("teacher_input and input must be on the same device")
    opts = make_kl(**options)
    C = input.shape[-1]
    lbl = None if target is None else class_ids(target, input.shape[:-1], "input's leading shape")
    tw = check_token_weight(token_weight, input.shape[:-1], input.device)
    loss_rows, _stats = distillation_rows(input.reshape(-1, C), teacher_input.detach().reshape(-1, C), lbl,
                                          opts)
    return reduce_tokens(loss_rows, lbl, opts, input.shape[:-1], tw)


# Typing only: the log-probabilities alone without return_entropy, else they or (logp, entropy).
@overload
def token_logprobs(input: Tensor, target: Tensor, *, temperature: float = ...,
                   return_entropy: Literal[False] = ..., ignore_index: int = ...,
                   softcap: Optional[float] = ..., token_weight: Optional[Tensor] = ...,
                   process_group: Optional[Any] = ..., vocab_start_index: Optional[int] = ...) -> Tensor: ...
@overload
def token_logprobs(input: Tensor, target: Tensor, *, temperature: float = ...,
                   return_entropy: bool = ..., ignore_index: int = ..., softcap: Optional[float] = ...,
                   token_weight: Optional[Tensor] = ...,
                   process_group: Optional[Any] = ..., vocab_start_index: Optional[int] = ...
                   ) -> Union[Tensor, tuple[Tensor, Tensor]]: ...
@renamed_keywords(**LOGPROBS)
def token_logprobs(input: Tensor, target: Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, ignore_index: int = -100, softcap: Optional[float] = None,
                   token_weight: Optional[Tensor] = None, process_group: Optional[Any] = None,
                   vocab_start_index: Optional[int] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Per-position log softmax(cap(input) / T)[target] (and the entropy of that softmax).

    Args:
        input: (..., C) logits, float16 / bfloat16 / float32 (float64 runs the torch path).
        target: int64 / int32 / uint8 ids of shape ``input.shape[:-1]``, in [0, C) or
            ``ignore_index`` (IndexError on CPU otherwise; NaN log-prob on CUDA).
        temperature: T > 0, finite; divides the (capped) logits (logit_scale = 1 / T).
        return_entropy: also return -sum_j q_j log q_j, q = softmax(cap(input) / T).
        ignore_index: a position whose target equals it (the CE heads' name and default) returns
            log-prob 0 and entropy 0 and gets no gradient (through either output); its logits are
            not read by the kernels. Any int, a valid class id included.
        softcap: None or a positive float: the logits are capped, z -> softcap tanh(z / softcap),
            BEFORE the temperature (cap(z) / T, as Gemma).
        token_weight: optional float weights of the target's shape: each position's log-prob (and
            entropy) is multiplied by its weight (its gradient too).
        process_group: vocabulary parallelism (``kl/parallel.py``): ``input`` is this rank's
            class slice, ``target`` global ids; every rank returns the full-vocabulary values.
            ``softcap`` caps each shard's logits; ``token_weight``: the same on every rank;
            ``ignore_index``: agreed on by every rank (an ignored row is skipped on each shard).
        vocab_start_index: this rank's first class (None on every rank: shards in rank order).

    Returns:
        float32 log-probs of the target's shape (float64 for float64 input), or the pair
        (log-probs, entropy). Both are differentiable with any per-token upstream gradient (the
        gradient has the input's dtype).

    Example:
        >>> logits = torch.randn(2, 16, 32000, dtype=torch.bfloat16, requires_grad=True)
        >>> ids = torch.randint(0, 32000, (2, 16))
        >>> lp, ent = token_logprobs(logits, ids, temperature=0.7, return_entropy=True)
        >>> (-(lp * torch.randn(2, 16)).sum() - 0.01 * ent.sum()).backward()
    """
    options: dict[str, Any] = dict(temperature=temperature, return_entropy=return_entropy, softcap=softcap,
                   ignore_index=ignore_index, has_token_weight=token_weight is not None)
    if is_dtensor(input) or process_group is not None or vocab_start_index is not None:
        opts, error = deferred_kl(**options)  # a rank's error is raised after the exchange, on every rank
        T, cap, ign = (opts.temperature, opts.softcap, opts.ignore_index) if opts is not None \
            else (temperature, 0.0, -100)
        if is_dtensor(input):  # the layout comes from the placements (kl/dtensor.py)
            error = error or placement_layout_error(process_group, vocab_start_index, "token_logprobs")
            return dtensor_token_logprobs(input, target, T, return_entropy, error, cap, token_weight, ign)
        tw, error = parallel_token_weight(token_weight, input, error)
        res = vocab_parallel_token_logprobs(input, target, T, return_entropy, process_group,
                                            vocab_start_index, agree_token_weight(token_weight), error, cap,
                                            ign)
        return weighted_outputs(res, tw)
    check_logits("input", input)
    opts = make_kl(**options)
    C = input.shape[-1]
    tok = class_ids(target, input.shape[:-1], "input's leading shape")
    tw = check_token_weight(token_weight, input.shape[:-1], input.device)
    lp, ent, _stats = token_logprobs_rows(input.reshape(-1, C), tok, opts)
    shape = input.shape[:-1]
    outs = weighted((lp, ent) if opts.return_entropy else (lp,), tw)
    outs = tuple(o.view(shape) for o in outs)
    return (outs[0], outs[1]) if opts.return_entropy else outs[0]
