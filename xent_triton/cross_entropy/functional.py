"""``cross_entropy``: a drop-in for ``torch.nn.functional.cross_entropy``."""
from __future__ import annotations

import warnings
from typing import Any, Literal, Optional, Union, cast, overload

import torch
from torch import Tensor

from ..core.dtensor import is_dtensor, placement_layout_error
from ..core.inputs import canonical, check_token_weight, check_weight, single_device_layout
from ..core.options import make_options
from ..core.reduction import loss_stats, reduce_rows
from ..core.runtime import compute_dtype
from .dtensor import dtensor_cross_entropy
from .ops import cross_entropy_rows
from .parallel import vocab_parallel_cross_entropy


def inplace_refusal(x: Tensor) -> Optional[str]:
    """Why the gradient cannot be written over ``x`` (None when it can)."""
    if x.is_leaf:
        return "the logits are a leaf tensor (their .grad would share their storage)"
    if is_dtensor(x):  # the gradient is written over this rank's local shard
        with torch.no_grad():
            x = x.to_local()
    dims = sorted((d for d in range(x.dim()) if x.shape[d] > 1), key=lambda d: x.stride(d))
    span = 1
    for d in dims:
        if x.stride(d) < span:
            return "the logits overlap in memory (e.g. an expanded tensor)"
        span = x.stride(d) * x.shape[d]
    return None


# Typing only: the loss alone without return_lse / return_stats, else the loss or the tuple (Returns).
@overload
def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = ..., ignore_index: int = ...,
                  reduction: str = ..., label_smoothing: float = ..., *, lse_square_scale: float = ...,
                  softcap: Optional[float] = ..., logit_scale: float = ..., inplace_backward: bool = ...,
                  return_lse: Literal[False] = ..., empty_batch: str = ...,
                  return_stats: Literal[False] = ..., return_predicted: bool = ...,
                  token_weight: Optional[Tensor] = ..., process_group: Any = ...,
                  vocab_start_index: Optional[int] = ...) -> Tensor: ...
@overload
def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = ..., ignore_index: int = ...,
                  reduction: str = ..., label_smoothing: float = ..., *, lse_square_scale: float = ...,
                  softcap: Optional[float] = ..., logit_scale: float = ..., inplace_backward: bool = ...,
                  return_lse: bool = ..., empty_batch: str = ..., return_stats: bool = ...,
                  return_predicted: bool = ..., token_weight: Optional[Tensor] = ...,
                  process_group: Any = ..., vocab_start_index: Optional[int] = ...,
                  ) -> Union[Tensor, tuple[Any, ...]]: ...
def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
                  lse_square_scale: float = 0.0, softcap: Optional[float] = None,
                  logit_scale: float = 1.0, inplace_backward: bool = False,
                  return_lse: bool = False, empty_batch: str = "nan", return_stats: bool = False,
                  return_predicted: bool = False, token_weight: Optional[Tensor] = None,
                  process_group: Any = None, vocab_start_index: Optional[int] = None,
                  ) -> Union[Tensor, tuple[Any, ...]]:
    """Fused cross-entropy with ``torch.nn.functional.cross_entropy`` semantics.

    Args:
        input: logits (C), (N, C) or (N, C, d1, ..., dK); float16, bfloat16, float32 (float64 runs
            the torch fallback). Any strides, no copy.
        target: class ids () / (N) / (N, d1, ..., dK) (int64, int32 or uint8), or class
            probabilities of the input's shape (any float dtype).
        weight, ignore_index, reduction, label_smoothing: as in PyTorch (``ignore_index=None``
            means -100).
        lse_square_scale: z-loss scale zl: adds zl * lse**2 per non-ignored token; ``mean``
            averages it over the non-ignored tokens (independent of class weights).
        softcap: s > 0 maps logits z -> s * tanh(z / s) before the softmax (after ``logit_scale``).
        logit_scale: a maps logits x -> a * x first.
        inplace_backward: write the gradient into ``input``'s storage (no extra N x C memory); the
            input's version counter is bumped, so autograd raises if anything else needed those
            values. Ignored, with a warning, for leaf or self-overlapping logits.
        return_lse: also return the log-sum-exp per token (target's shape), differentiable.
        empty_batch: "nan" (torch's mean over no valid token) or "zero" (0, zero gradients).
        return_stats: also return ``LossStats(n_valid, n_correct, entropy_sum, predicted)`` from
            the same pass over the logits (raw sums, device tensors); ``predicted`` (argmax per
            token) only with ``return_predicted=True``.
        token_weight: per-token weights (the target's shape) multiplying each token's loss;
            ``mean`` divides by the sum of the token weights times the class weights of the
            non-ignored tokens (docs/math.md).
        process_group, vocab_start_index: vocabulary (tensor) parallelism, see docs/distributed.md:
            ``input`` is this rank's contiguous slice of the classes; targets hold global ids
            (``vocab_start_index`` without ``process_group``, or either with DTensor input, raises
            ValueError; with DTensors on every rank alike).

    Returns:
        The float32 loss (float64 for float64 input; a scalar, or the target's shape for
        ``reduction="none"``), then the lse if ``return_lse``, then the stats if ``return_stats``.
        The gradient has the input's dtype.
        Out-of-range class ids raise IndexError on CPU; on CUDA (no host sync) they make that
        token's loss and gradient NaN, hence a NaN mean.

    Example:
        >>> logits = torch.randn(8, 32000, dtype=torch.bfloat16, requires_grad=True)
        >>> target = torch.randint(0, 32000, (8,))
        >>> loss = cross_entropy(logits, target, label_smoothing=0.1)
        >>> loss.backward()
    """
    dtensor = is_dtensor(input)
    opts, options_error = make_options(
        process_group is not None or dtensor, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap,
        logit_scale=logit_scale, empty_batch=empty_batch)
    if inplace_backward and isinstance(input, Tensor) and input.requires_grad:
        why = inplace_refusal(input)  # on every path alike (a local choice: no agreement needed)
        if why is not None:
            warnings.warn(f"xent_triton.cross_entropy: inplace_backward ignored: {why}", stacklevel=2)
            inplace_backward = False
    if dtensor:  # the layout comes from the placements (core/dtensor.py); refused options and
        # invalid ones join the options agreement first (core/exchange.py): no rank raises alone
        options_error = options_error or placement_layout_error(process_group, vocab_start_index,
                                                                "cross_entropy")
        return dtensor_cross_entropy(cast(Any, input), target, weight, opts,
                                     inplace_backward=inplace_backward,
                                     return_lse=return_lse, options_error=options_error,
                                     unsupported=dict(return_stats=return_stats, token_weight=token_weight))
    if process_group is not None:
        return vocab_parallel_cross_entropy(input, target, weight, opts, inplace_backward=inplace_backward,
                                            return_lse=return_lse, process_group=process_group,
                                            vocab_start_index=vocab_start_index, options_error=options_error,
                                            unsupported=dict(return_stats=return_stats),
                                            token_weight=token_weight)
    single_device_layout(vocab_start_index, "cross_entropy")
    can = canonical(input, target)
    w = check_weight(weight, can.C, input.device, input.dtype)
    tw = check_token_weight(token_weight, can)
    skip = not return_lse and opts.lse_square_scale == 0  # no output reads an ignored row's lse
    loss_rows, lse, stats, ent, pred = cross_entropy_rows(can.x3, can.target, w, opts, inplace_backward,
                                                          return_stats, skip)
    loss = reduce_rows(loss_rows, lse, stats, can.target, opts, can.rows_to_output, tw)
    out: tuple[Any, ...] = (loss,)
    if return_lse:
        out += (can.rows_to_output(lse.to(compute_dtype(input))),)
    if return_stats:
        out += (loss_stats(can.target, ent, pred, opts.ignore_index, return_predicted, can.rows_to_output),)
    return out[0] if len(out) == 1 else out
