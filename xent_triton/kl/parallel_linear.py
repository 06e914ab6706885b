"""Vocabulary-parallel ``linear_token_logprobs`` and ``linear_distillation_loss``: class-sharded heads.

Rank r holds the head rows ``W[start:start + C_local]`` (and bias slice) of ``process_group``'s
layout; hidden states and GLOBAL token / label ids are the same on every rank. The shard's logits
``F.linear(hidden, W_shard, b_shard)`` (N x C_local, materialised: not the fused chunked kernels)
go to the logits-level code (``kl/parallel.py``, ``kl/parallel_distill.py``): the same O(N)
forward collectives. The input gradient is summed over the group in backward by one
``all_reduce(SUM)`` of fp32 (float64 for float64) dX (N x D), as the CE linear head
(``parallel/linear.py``) and Megatron's ``copy_to_tensor_model_parallel_region`` do. Whether the
input needs a gradient is agreed in the layout exchange (so every rank enters that all-reduce or
none). The teacher head is a constant.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..options import autocast_operands
from ..parallel.layout import ReduceGradOver
from .parallel import vocab_parallel_token_logprobs
from .parallel_distill import vocab_parallel_distillation_rows

STUDENT = ("student_hidden", "student_weight", "student_bias")
TEACHER = ("teacher_hidden", "teacher_weight", "teacher_bias")


def check_shard_head(names: tuple[str, str, str], h: Tensor, w: Tensor, b: Optional[Tensor],
                     classes: str = "C_local") -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The head's (hidden, weight, bias), named ``names`` in errors (W (``classes``, D); a shard may hold
    no class); under ``torch.autocast`` cast to the autocast dtype as ``F.linear`` computes them."""
    hn, wn, bn = names
    for what, t in ((hn, h), (wn, w)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor")
    h, w, b = autocast_operands(h, w, b)
    if h.dim() < 1 or w.dim() != 2 or h.shape[-1] != w.shape[1]:
        raise ValueError(f"{hn} (..., D) and {wn} ({classes}, D) do not match: {tuple(h.shape)} vs "
                         f"{tuple(w.shape)}")
    if w.dtype != h.dtype or w.device != h.device:
        raise ValueError(f"{wn} must have {hn}'s dtype and device (outside torch.autocast)")
    if b is not None and (b.shape != (w.shape[0],) or b.dtype != h.dtype):
        raise ValueError(f"{bn} must be ({w.shape[0]},) of {hn}'s dtype")
    return h, w, b


def shard_logits(h: Tensor, w: Tensor, b: Optional[Tensor], group: Any, reduce_dx: bool) -> Tensor:
    if reduce_dx:
        h = ReduceGradOver.apply(h, [group])
    return F.linear(h, w, b)


def vocab_parallel_linear_token_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor,
                                         bias: Optional[Tensor], temperature: float, return_entropy: bool,
                                         process_group: Any, vocab_start_index: Optional[int] = None,
                                         error: Optional[BaseException] = None,
                                         extra_agree: Optional[dict] = None, chunk_size: Optional[int] = None
                                         ) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``linear_token_logprobs`` with ``weight`` / ``bias`` this rank's class shard (called by it;
    ``temperature`` validated there, ``error`` its validation error, raised on every rank)."""
    logits = hidden
    try:
        hidden, weight, bias = check_shard_head(("hidden", "weight", "bias"), hidden, weight, bias)
        logits = shard_logits(hidden, weight, bias, process_group, hidden.requires_grad)
    except (TypeError, ValueError) as e:  # raised after the exchange, on every rank
        error = error or e
    needs_dx = float(isinstance(hidden, Tensor) and hidden.requires_grad)
    return vocab_parallel_token_logprobs(logits, tokens, temperature, return_entropy, process_group,
                                         vocab_start_index,
                                         dict(input_requires_grad=needs_dx, **(extra_agree or {})), error)


def vocab_parallel_linear_distillation_rows(student_hidden: Tensor, student_weight: Tensor,
                                            teacher_hidden: Tensor, teacher_weight: Tensor,
                                            labels: Optional[Tensor], student_bias: Optional[Tensor],
                                            teacher_bias: Optional[Tensor], chosen: Optional[tuple],
                                            process_group: Any, vocab_start_index: Optional[int] = None,
                                            error: Optional[BaseException] = None,
                                            extra_agree: Optional[dict] = None,
                                            chunk_size: Optional[int] = None
                                            ) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token ``linear_distillation_loss`` (R,) and the flat labels with both heads this rank's
    class shard (same layout); the caller reduces. ``chosen`` / ``error``: as
    ``vocab_parallel_distillation_rows``."""
    xs, xt = student_hidden, teacher_hidden
    try:
        hs, ws, bs = check_shard_head(STUDENT, student_hidden, student_weight, student_bias)
        ht, wt, bt = check_shard_head(TEACHER, teacher_hidden, teacher_weight, teacher_bias)
        if ws.shape[0] != wt.shape[0]:
            raise ValueError(f"student and teacher head shards have different class counts: {ws.shape[0]} "
                             f"vs {wt.shape[0]}: they must share one layout")
        if ht.shape[:-1] != hs.shape[:-1]:
            raise ValueError(f"teacher_hidden's leading shape {tuple(ht.shape[:-1])} != student_hidden's "
                             f"{tuple(hs.shape[:-1])}")
        xs = shard_logits(hs, ws, bs, process_group, hs.requires_grad)
        with torch.no_grad():
            xt = F.linear(ht, wt, bt)
    except (TypeError, ValueError) as e:  # raised after the exchange, on every rank
        error = error or e
    needs_dx = float(isinstance(student_hidden, Tensor) and student_hidden.requires_grad)
    return vocab_parallel_distillation_rows(xs, xt, labels, chosen, process_group, vocab_start_index,
                                            dict(input_requires_grad=needs_dx, **(extra_agree or {})), error)
