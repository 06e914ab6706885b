"""Public API of the fused linear cross-entropy: ``linear_cross_entropy`` and ``LinearCrossEntropyLoss``.

``linear_cross_entropy(h, W, y, ...)`` equals ``F.cross_entropy(F.linear(h, W, b), y, ...)`` (plus
the core's extras) without ever materialising the N×C logits; see
``kernels/linear_cross_entropy.py`` for the algorithm and its FLOP / byte / memory budget.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import linear_ops
from .functional import _FLOAT_DTYPES, check_options, check_target_range, check_weight, reduce_rows


def _check_linear(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor],
                  target: Tensor) -> None:
    """Shapes, dtypes and devices of the linear layer's operands (raises TypeError/ValueError)."""
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if input.dim() < 1:
        raise ValueError("input must have shape (..., D); got a scalar")
    if linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must have shape (C, D), got {tuple(linear_weight.shape)}")
    C, D = linear_weight.shape
    if input.shape[-1] != D:
        raise ValueError(f"input's last dimension ({input.shape[-1]}) must equal linear_weight's "
                         f"in_features D = {D} (linear_weight has shape {tuple(linear_weight.shape)})")
    if C == 0:
        raise ValueError("linear_weight has no classes (C = 0)")
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"linear_weight dtype {linear_weight.dtype} must match input dtype {input.dtype} "
                        "(no implicit promotion; cast one of them)")
    if linear_weight.device != input.device:
        raise ValueError(f"linear_weight is on {linear_weight.device} but input is on {input.device}")
    if linear_bias is not None:
        if not isinstance(linear_bias, Tensor):
            raise TypeError(f"linear_bias must be a tensor or None, got {type(linear_bias).__name__}")
        if linear_bias.shape != (C,):
            raise ValueError(f"linear_bias must have shape ({C},) (one per class), got {tuple(linear_bias.shape)}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias dtype {linear_bias.dtype} must match input dtype {input.dtype}")
        if linear_bias.device != input.device:
            raise ValueError(f"linear_bias is on {linear_bias.device} but input is on {input.device}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if target.is_floating_point():
        raise TypeError("linear_cross_entropy takes class-index targets (int64/int32); probability "
                        "targets are not supported")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64/int32 class ids, got {target.dtype}")
    if target.shape != input.shape[:-1]:
        raise ValueError(f"target must have input's leading shape {tuple(input.shape[:-1])}, "
                         f"got {tuple(target.shape)}")


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                         softcap: Optional[float] = None, logit_scale: float = 1.0,
                         return_lse: bool = False, process_group: Any = None,
                         vocab_start_index: Optional[int] = None,
                         reduce_input_grad: bool = True) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Cross-entropy of the logits ``input @ linear_weight.T + linear_bias``, fused.

    Equals ``cross_entropy(F.linear(input, linear_weight, linear_bias), target, weight, ...)`` of
    this package (same options, same formulas) but the (N, C) logits never exist: they are formed
    tile by tile in on-chip memory, in forward and again in backward.

    Args:
        input: hidden states (..., D), float16 / bfloat16 / float32 (float64 and CPU tensors
            without ``TRITON_INTERPRET=1`` run a chunked pure-torch path); any strides.
        linear_weight: (C, D) classifier, same dtype and device as ``input``.
        target: int64/int32 class ids of shape ``input.shape[:-1]``.
        linear_bias: optional (C,) bias, same dtype as ``input``.
        weight, ignore_index, reduction, label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        lse_square_scale: z-loss scale zl: adds zl * lse**2 per non-ignored token (not class-weighted,
            divided by the same ``mean`` denominator).
        softcap: s > 0 maps logits z -> s * tanh(z / s) (after ``logit_scale``).
        logit_scale: a maps logits x -> a * x first.
        return_lse: also return the log-sum-exp per token (target's shape, the loss's dtype),
            differentiable.
        process_group: vocabulary (tensor) parallelism: ``linear_weight`` / ``linear_bias`` hold this
            rank's contiguous slice of the classes, ``target`` global ids, ``weight`` the global class
            weights; every rank returns the full-vocabulary loss. See ``xent_triton.linear_parallel``.
        vocab_start_index: this rank's first class id (None: shards in group-rank order).
        reduce_input_grad: under ``process_group``, all-reduce the input gradient across the group
            (Megatron's column-parallel layout); False leaves each rank's partial.

    Returns:
        The float32 loss (float64 for float64 input; scalar, or target's shape for
        ``reduction="none"``) and, with ``return_lse``, the lse (same dtype). Gradients reach ``input``, ``linear_weight`` and ``linear_bias``
        (those that require grad) in their own dtypes. A class id outside [0, C) that is not
        ``ignore_index`` raises IndexError on CPU; on CUDA (no host sync) it makes the loss NaN
        (and every gradient, since all classes' weight gradients include that token).

    Example:
        >>> h = torch.randn(4, 128, 64, dtype=torch.bfloat16, requires_grad=True)
        >>> W = torch.randn(32000, 64, dtype=torch.bfloat16, requires_grad=True)
        >>> y = torch.randint(0, 32000, (4, 128))
        >>> linear_cross_entropy(h, W, y, label_smoothing=0.1).backward()
    """
    if process_group is not None:
        from .linear_parallel import vocab_parallel_linear_cross_entropy
        return vocab_parallel_linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight,
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            lse_square_scale=lse_square_scale, softcap=softcap, logit_scale=logit_scale,
            return_lse=return_lse, process_group=process_group, vocab_start_index=vocab_start_index,
            reduce_input_grad=reduce_input_grad)
    check_options(reduction, label_smoothing, lse_square_scale, softcap, logit_scale)
    _check_linear(input, linear_weight, linear_bias, target)
    C, D = linear_weight.shape
    w = check_weight(weight, C, input.device)
    if w is not None and input.dtype != torch.float64:
        w = w.float()  # kernels read fp32 class weights
    tgt = target.reshape(-1).to(torch.int64).contiguous()  # kernels read targets with unit stride
    check_target_range(tgt, C, int(ignore_index))
    x2 = input.reshape(-1, D)
    bias = linear_bias.contiguous() if linear_bias is not None else None
    loss_rows, lse, stats = linear_ops.linear_cross_entropy_rows(
        x2, linear_weight, bias, tgt, w, int(ignore_index), float(label_smoothing),
        float(lse_square_scale), float(softcap) if softcap is not None else 0.0, float(logit_scale),
        not return_lse)
    loss = reduce_rows(loss_rows, stats, reduction, False, target.shape)
    return (loss, lse.view(target.shape)) if return_lse else loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`linear_cross_entropy`; ``forward(input, linear_weight, target,
    linear_bias=None)``. ``weight`` (class weights) is a registered buffer.

    Example:
        >>> crit = LinearCrossEntropyLoss(ignore_index=-100, lse_square_scale=1e-4)
        >>> loss = crit(torch.randn(8, 64), torch.randn(1000, 64), torch.randint(0, 1000, (8,)))
    """

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, *,
                 lse_square_scale: float = 0.0, softcap: Optional[float] = None,
                 logit_scale: float = 1.0, return_lse: bool = False, process_group: Any = None,
                 vocab_start_index: Optional[int] = None, reduce_input_grad: bool = True) -> None:
        super().__init__()
        check_options(reduction, label_smoothing, lse_square_scale, softcap, logit_scale)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.return_lse = return_lse
        self.process_group = process_group  # vocabulary parallelism (xent_triton.linear_parallel)
        self.vocab_start_index = vocab_start_index
        self.reduce_input_grad = reduce_input_grad

    def forward(self, input: Tensor, linear_weight: Tensor, target: Tensor,
                linear_bias: Optional[Tensor] = None):
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                    weight=self.weight, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    lse_square_scale=self.lse_square_scale, softcap=self.softcap,
                                    logit_scale=self.logit_scale, return_lse=self.return_lse,
                                    process_group=self.process_group,
                                    vocab_start_index=self.vocab_start_index,
                                    reduce_input_grad=self.reduce_input_grad)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, lse_square_scale={self.lse_square_scale}, "
                f"softcap={self.softcap}, logit_scale={self.logit_scale}")
