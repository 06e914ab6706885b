"""Public functional API: ``cross_entropy``, a drop-in for ``torch.nn.functional.cross_entropy``."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from . import ops

_REDUCTIONS = ("none", "mean", "sum")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_options(reduction: str, label_smoothing: float, lse_square_scale: float,
                  softcap: Optional[float], logit_scale: float) -> None:
    """Validate the scalar options shared by every entry point (raises ValueError/TypeError)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not (float(softcap) > 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a positive finite float or None, got {softcap}")
    for name, v in (("lse_square_scale", lse_square_scale), ("logit_scale", logit_scale)):
        if isinstance(v, Tensor) or not math.isfinite(float(v)):
            raise ValueError(f"{name} must be a finite Python float, got {v!r}")


def check_weight(weight: Optional[Tensor], C: int, device: torch.device) -> Optional[Tensor]:
    """Class weights as a contiguous float32 (C,) tensor (float64 kept for the reference path)."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError("weight must be a floating-point tensor")
    if weight.dim() != 1 or weight.shape[0] != C:
        raise ValueError(f"weight must have shape ({C},) (one per class), got {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but input is on {device}")
    if weight.requires_grad:
        raise NotImplementedError("the gradient with respect to weight is not supported")
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return weight.to(dt).contiguous()


def check_target_range(target: Tensor, C: int, ignore_index: int) -> None:
    """On CPU (where it costs no device sync) raise for class ids outside [0, C).

    On CUDA the check is skipped; the kernel makes such a row's loss (and a mean) NaN instead.
    """
    if target.device.type != "cpu" or ops._is_compiling() or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= C))
    if bool(bad.any()):
        v = int(target[bad][0])
        raise IndexError(f"Target {v} is out of bounds: expected class ids in [0, {C}) or ignore_index={ignore_index}")


def reduce_rows(loss_rows: Tensor, stats: Tensor, reduction: str, soft: bool, out_shape) -> Tensor:
    """Apply ``reduction`` to per-row losses. ``mean`` divides by the summed row weights of the
    non-ignored hard targets (``stats[:, 2]``, torch's denominator; NaN when all are ignored) or, for
    soft targets, by the number of rows. No host sync: the denominator stays a device tensor."""
    if reduction == "none":
        return loss_rows.view(out_shape)
    if reduction == "sum":
        return loss_rows.sum()
    if soft:
        return loss_rows.sum() / loss_rows.shape[0]
    return loss_rows.sum() / stats[:, 2].sum().to(loss_rows.dtype)


def _canonical(input: Tensor, target: Tensor):
    """(N, C, D) view of the logits, the target in kernel form, the per-row output shape."""
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError("input and target must be tensors")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64 logits, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have shape (C), (N, C) or (N, C, d1, ..., dK); got a scalar")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    if C == 0:
        raise ValueError("input has no classes (C = 0)")
    if input.dim() == 1:
        x3 = input.view(1, C, 1) if input.stride(0) == 1 else input.unsqueeze(0).unsqueeze(-1)
    elif input.dim() == 2:
        x3 = input.unsqueeze(-1)
    else:
        x3 = input.reshape(input.shape[0], C, -1)
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(f"class-probability target must have the input's shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
        if target.dtype != input.dtype:
            raise TypeError(f"class-probability target dtype {target.dtype} must match input dtype {input.dtype}")
        if target.requires_grad:
            raise NotImplementedError("the gradient with respect to a probability target is not supported")
        t = target.view(1, C, 1) if target.dim() == 1 else (
            target.unsqueeze(-1) if target.dim() == 2 else target.reshape(target.shape[0], C, -1))
        return x3, t, input.shape[:1] + input.shape[2:] if input.dim() > 1 else (), C
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64/int32 class ids or float class probabilities, got {target.dtype}")
    expected = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
    if target.shape != expected:
        raise ValueError(f"target of class ids must have shape {tuple(expected)} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    return x3, target.reshape(-1).to(torch.int64).contiguous(), expected, C


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
                  lse_square_scale: float = 0.0, softcap: Optional[float] = None,
                  logit_scale: float = 1.0, inplace_backward: bool = False,
                  return_lse: bool = False, process_group=None,
                  vocab_start_index: Optional[int] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Fused cross-entropy with ``torch.nn.functional.cross_entropy`` semantics.

    Args:
        input: logits (C), (N, C) or (N, C, d1, ..., dK); float16, bfloat16, float32 (float64 runs
            the pure-torch reference). Any strides; a unit class stride reads coalesced.
        target: class ids () / (N) / (N, d1, ..., dK) (int64 or int32), or class probabilities of the
            input's shape and dtype.
        weight, ignore_index, reduction, label_smoothing: as in PyTorch.
        lse_square_scale: z-loss scale zl; adds zl * lse**2 per non-ignored token (not class-weighted;
            divided by the same ``mean`` denominator).
        softcap: s > 0 maps logits z -> s * tanh(z / s) before the softmax (after ``logit_scale``).
        logit_scale: a maps logits x -> a * x first.
        inplace_backward: write the gradient into ``input``'s storage (no extra N x C memory). The
            input's values are destroyed by backward: use it only when nothing else reads them.
        return_lse: also return the float32 log-sum-exp per token (target's shape), differentiable.
        process_group: vocabulary (tensor) parallelism. When given, ``input`` (and a probability
            target) is this rank's contiguous slice of the class dimension; class-id targets hold
            global ids and, like ``weight`` (the global (C_global,) weights), are the same on every
            rank. Every rank returns the full-vocabulary loss (and lse) and gets its shard's
            gradient; two O(tokens) all-reduces per call. See ``xent_triton.distributed``.
        vocab_start_index: this rank's first class id under ``process_group``; None (on every rank)
            places the shards in group-rank order (Megatron's layout; shards may be unequal).

    Returns:
        The float32 loss (float64 for float64 input; a scalar, or the target's shape for
        ``reduction="none"``), and the lse if
        ``return_lse``. The gradient has the input's dtype. Out-of-range class ids raise IndexError on
        CPU; on CUDA (no host sync) they make that token's loss and gradient NaN, hence a NaN mean.

    Example:
        >>> logits = torch.randn(8, 32000, dtype=torch.bfloat16, requires_grad=True)
        >>> target = torch.randint(0, 32000, (8,))
        >>> loss = cross_entropy(logits, target, label_smoothing=0.1)
        >>> loss.backward()
    """
    if process_group is not None:
        from .distributed import vocab_parallel_cross_entropy
        return vocab_parallel_cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing,
            lse_square_scale=lse_square_scale, softcap=softcap, logit_scale=logit_scale,
            inplace_backward=inplace_backward, return_lse=return_lse, process_group=process_group,
            vocab_start_index=vocab_start_index)
    check_options(reduction, label_smoothing, lse_square_scale, softcap, logit_scale)
    x3, tgt, out_shape, C = _canonical(input, target)
    w = check_weight(weight, C, input.device)
    if w is not None and input.dtype != torch.float64:
        w = w.float()  # kernels read fp32 weights; float64 weights only on the float64 path
    if not tgt.is_floating_point():
        check_target_range(tgt, C, int(ignore_index))
    loss_rows, lse, stats = ops.cross_entropy_rows(
        x3, tgt, w, int(ignore_index), float(label_smoothing), float(lse_square_scale),
        float(softcap) if softcap is not None else 0.0, float(logit_scale), bool(inplace_backward))
    loss = reduce_rows(loss_rows, stats, reduction, tgt.is_floating_point(), out_shape)
    return (loss, lse.view(out_shape)) if return_lse else loss
