"""Public functions of the KL family: ``distillation_loss`` and ``token_logprobs``.

Both take logits over the last dimension, ``(..., C)``, as language models produce them, and run
one streaming forward and one recomputing backward kernel (``kl/distill_kernels.py``,
``kl/logprobs_kernels.py``); nothing N x C is materialised besides the gradient.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union, overload

import torch
from torch import Tensor

from ..core.dtensor import is_dtensor
from ..core.inputs import class_ids
from ..core.options import LossOptions
from ..core.reduction import finish_sums, row_sums
from ..core.runtime import is_compiling
from .dtensor import dtensor_distillation_loss, dtensor_token_logprobs
from .ops import DIVERGENCES
from .parallel import vocab_parallel_token_logprobs
from .parallel_distill import vocab_parallel_distillation_rows


def symbolic(v) -> bool:
    return isinstance(v, (torch.SymFloat, torch.SymInt))


def check_real(name: str, v, ok, requirement: str) -> float:
    """A Python float satisfying ``ok`` (TypeError / ValueError naming the option otherwise).

    Compile-safe as the CE heads' options: a value that ``torch.compile(dynamic=True)`` made
    symbolic is not forced, and under dynamo ``math.isfinite`` (which it cannot trace) is skipped;
    the comparisons in ``ok`` become guards."""
    if isinstance(v, Tensor):
        raise ValueError(f"{name} must be a finite Python float, got a tensor")
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not symbolic(v):
        raise TypeError(f"{name} must be a Python float, got {type(v).__name__}")
    if symbolic(v):
        return v
    finite = True if is_compiling() else math.isfinite(v)
    if not (finite and ok(v)):
        raise ValueError(f"{name} must be {requirement}, got {v!r}")
    return float(v)


def check_logits(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of shape (..., C)")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a class dimension (..., C), got a scalar")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has no classes (C = 0)")


def distill_options(divergence: str, beta: float, temperature: float, reduction: str,
                    ce_weight: float, has_labels: bool, ignore_index=-100,
                    empty_batch: str = "nan") -> tuple[int, float, float, float, LossOptions]:
    """Validated (divergence id, beta, temperature, ce_weight, options); ignore_index, reduction and
    empty_batch are validated as the CE heads' (``LossOptions.make``: TypeError for a bool / float
    ignore_index, None = -100)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {tuple(DIVERGENCES)}, got {divergence!r}")
    opts = LossOptions.make(ignore_index=ignore_index, reduction=reduction, empty_batch=empty_batch)
    temperature = check_real("temperature", temperature, lambda v: v > 0, "a positive finite float")
    if divergence == "jsd":
        beta = check_real("beta", beta, lambda v: 0 < v < 1,
                          "in (0, 1) for jsd (use divergence='kl' or 'reverse_kl' for the endpoints)")
    ce_weight = check_real("ce_weight", ce_weight, lambda v: 0 <= v <= 1, "in [0, 1]")
    if ce_weight != 0 and not has_labels:
        raise ValueError("ce_weight > 0 needs labels (the hard-label cross-entropy's class ids)")
    return DIVERGENCES[divergence], beta if symbolic(beta) else float(beta), temperature, ce_weight, opts


def reduce_tokens(loss_rows: Tensor, labels: Optional[Tensor], opts: LossOptions, shape) -> Tensor:
    """none: the tokens' shape; sum; mean over the non-ignored tokens (all without labels).
    ``empty_batch="zero"``: a mean over no token is 0 (zero gradients, graph connected), else NaN."""
    if opts.reduction == "none":
        return loss_rows.view(shape)
    valid = torch.ones_like(loss_rows, dtype=torch.bool) if labels is None else labels != opts.ignore_index
    return finish_sums(row_sums(loss_rows, valid.to(loss_rows.dtype), valid, None, opts), opts)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
                      divergence: str = "kl", beta: float = 0.5, temperature: float = 1.0,
                      ignore_index: int = -100, reduction: str = "mean", ce_weight: float = 0.0,
                      empty_batch: str = "nan", process_group: Optional[Any] = None,
                      vocab_start_index: Optional[int] = None) -> Tensor:
    """Knowledge-distillation loss between student and teacher logits, fused and streamed.

    With p = softmax(teacher / T) and q = softmax(student / T) over the last dimension:
    ``"kl"`` = KL(p || q), ``"reverse_kl"`` = KL(q || p), ``"jsd"`` = beta KL(p || m) +
    (1 - beta) KL(q || m) with m = beta p + (1 - beta) q. 0 log 0 := 0 (padded -inf logits are
    fine). No T**2 factor is applied: multiply the loss by T**2 yourself if you want Hinton's
    scaling. Per token: ce_weight * CE(student at T = 1, label) + (1 - ce_weight) * divergence.

    Args:
        student_logits: (..., C) float16 / bfloat16 / float32 (float64 runs the torch fallback).
        teacher_logits: (..., C), any float dtype (e.g. fp32 with a bf16 student). Treated as a
            constant: it gets no gradient (detached), even if it requires grad.
        labels: optional class ids of shape ``student_logits.shape[:-1]``; tokens whose label is
            ``ignore_index`` are left out of every term (loss 0, gradient 0).
        divergence: "kl", "reverse_kl" or "jsd". beta: the JSD mixture weight, in (0, 1).
        temperature: T > 0, finite. ce_weight: alpha in [0, 1] (needs labels when > 0).
        ignore_index: an int (None: -100, as the CE heads; a bool or float raises TypeError).
        reduction: "none" (the tokens' shape), "sum", or "mean" (over non-ignored tokens; over all
            tokens when ``labels`` is None).
        empty_batch: "nan" (a mean over no valid token, as torch) or "zero" (0, zero gradients).
        process_group: vocabulary parallelism (``kl/parallel_distill.py``): both logits are this
            rank's class slice on the same layout, ``labels`` global ids; every rank returns the
            full-vocabulary loss. vocab_start_index: this rank's first class (None: rank order).

    Returns:
        The float32 loss (float64 for a float64 student). The gradient reaches the student only.
        Labels outside [0, C) that are not ``ignore_index`` raise IndexError on CPU; on CUDA they
        make that token's loss NaN.

    Example:
        >>> s = torch.randn(4, 7, 32000, dtype=torch.bfloat16, requires_grad=True)
        >>> t = torch.randn(4, 7, 32000)
        >>> distillation_loss(s, t, divergence="jsd", temperature=2.0).backward()
    """
    if is_dtensor(student_logits) or process_group is not None or vocab_start_index is not None:
        chosen, error = None, None  # a rank's error is raised after the layout exchange, on every rank
        try:
            chosen = distill_options(divergence, beta, temperature, reduction, ce_weight, labels is not None,
                                     ignore_index, empty_batch)
        except (TypeError, ValueError) as e:
            error = e
        if is_dtensor(student_logits):  # the layout comes from the placements (kl/dtensor.py)
            return dtensor_distillation_loss(student_logits, teacher_logits, labels, chosen, error)
        rows, lbl = vocab_parallel_distillation_rows(student_logits, teacher_logits, labels, chosen,
                                                     process_group, vocab_start_index, None, error)
        assert chosen is not None  # else the call above raised the error, on every rank
        return reduce_tokens(rows, lbl, chosen[4], student_logits.shape[:-1])
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape "
                         f"{tuple(student_logits.shape)}")
    if teacher_logits.device != student_logits.device:
        raise ValueError("teacher_logits and student_logits must be on the same device")
    div, beta, temperature, ce_weight, opts = distill_options(
        divergence, beta, temperature, reduction, ce_weight, labels is not None, ignore_index, empty_batch)
    C = student_logits.shape[-1]
    lbl = None if labels is None else class_ids(labels, student_logits.shape[:-1],
                                                "student_logits' leading shape")
    x = student_logits.reshape(-1, C)
    t = teacher_logits.detach().reshape(-1, C)
    loss_rows, _stats = torch.ops.xent_triton.distillation_fwd(x, t, lbl, div, beta, temperature,
                                                                opts.ignore_index, ce_weight)
    return reduce_tokens(loss_rows, lbl, opts, student_logits.shape[:-1])


# Typing only: the log-probabilities alone without return_entropy, else they or (logp, entropy).
@overload
def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = ...,
                   return_entropy: Literal[False] = ...,
                   process_group: Optional[Any] = ..., vocab_start_index: Optional[int] = ...) -> Tensor: ...
@overload
def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = ...,
                   return_entropy: bool = ...,
                   process_group: Optional[Any] = ..., vocab_start_index: Optional[int] = ...
                   ) -> Union[Tensor, tuple[Tensor, Tensor]]: ...
def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, process_group: Optional[Any] = None,
                   vocab_start_index: Optional[int] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Per-position log softmax(logits / T)[token] (and the entropy of softmax(logits / T)).

    Args:
        logits: (..., C) float16 / bfloat16 / float32 (float64 runs the torch fallback).
        tokens: int64 / int32 / uint8 ids of shape ``logits.shape[:-1]``, in [0, C) (IndexError on
            CPU otherwise; NaN log-prob on CUDA).
        temperature: T > 0, finite.
        return_entropy: also return -sum_j q_j log q_j, q = softmax(logits / T).
        process_group: vocabulary parallelism (``kl/parallel.py``): ``logits`` is this rank's
            class slice, ``tokens`` global ids; every rank returns the full-vocabulary values.
        vocab_start_index: this rank's first class (None on every rank: shards in rank order).

    Returns:
        float32 log-probs of the tokens' shape (float64 for float64 logits), or the pair
        (log-probs, entropy). Both are differentiable with any per-token upstream gradient (the
        gradient has the logits' dtype).

    Example:
        >>> logits = torch.randn(2, 16, 32000, dtype=torch.bfloat16, requires_grad=True)
        >>> tokens = torch.randint(0, 32000, (2, 16))
        >>> lp, ent = token_logprobs(logits, tokens, temperature=0.7, return_entropy=True)
        >>> (-(lp * torch.randn(2, 16)).sum() - 0.01 * ent.sum()).backward()
    """
    if is_dtensor(logits) or process_group is not None or vocab_start_index is not None:
        error = None  # a rank's error is raised after the layout exchange, on every rank
        try:
            temperature = check_real("temperature", temperature, lambda v: v > 0, "a positive finite float")
        except (TypeError, ValueError) as e:
            error = e
        if is_dtensor(logits):  # the layout comes from the placements (kl/dtensor.py)
            return dtensor_token_logprobs(logits, tokens, temperature, return_entropy, error)
        return vocab_parallel_token_logprobs(logits, tokens, temperature, return_entropy, process_group,
                                             vocab_start_index, None, error)
    check_logits("logits", logits)
    temperature = check_real("temperature", temperature, lambda v: v > 0, "a positive finite float")
    C = logits.shape[-1]
    tok = class_ids(tokens, logits.shape[:-1], "logits' leading shape")
    lp, ent, _stats = torch.ops.xent_triton.token_logprobs_fwd(logits.reshape(-1, C), tok, temperature,
                                                               bool(return_entropy))
    shape = logits.shape[:-1]
    if return_entropy:
        return lp.view(shape), ent.view(shape)
    return lp.view(shape)
