"""Input validation and canonical layout shared by every loss: class weights, class ids and their
range, token weights, the (N, C, D) view of logits and targets, the linear head's operands.

Checks never force a value that ``torch.compile(dynamic=True)`` made symbolic.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor

from .runtime import FLOAT_DTYPES

TARGET_DTYPES = (torch.int64, torch.int32, torch.uint8)


# ------------------------------------------------------------------------------------- inputs
def check_weight(weight: Optional[Tensor], C: int, device: torch.device,
                 input_dtype: torch.dtype) -> Optional[Tensor]:
    """Class weights as a contiguous (C,) float32 tensor (float64 for float64 inputs)."""
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
    dt = torch.float64 if input_dtype == torch.float64 else torch.float32
    return weight.detach().to(dt).contiguous()


def target_range_check(target: Tensor, C: int, ignore_index: int) -> None:
    if target.device.type != "cpu" or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= C))
    if bool(bad.any()):
        v = int(target[bad][0])
        raise IndexError(f"Target {v} is out of bounds: expected class ids in [0, {C}) or "
                         f"ignore_index={ignore_index}")


def single_device_layout(vocab_start_index: Optional[int], what: str) -> None:
    """A ``vocab_start_index`` without a ``process_group`` is refused, not ignored (one device holds
    every class; the KL family's vocabulary-parallel entry refuses it alike)."""
    if vocab_start_index is not None:
        raise ValueError(f"{what}: vocab_start_index={vocab_start_index} needs a process_group "
                         "(None means: not vocabulary-parallel)")


def class_ids(target: Tensor, expected_shape, what: str = "input") -> Tensor:
    """Hard targets as contiguous int64 (R,) (int64, int32 and uint8 ids are accepted)."""
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"target must be int64/int32/uint8 class ids or float class probabilities, "
                        f"got {target.dtype}")
    if target.shape != expected_shape:
        raise ValueError(f"target of class ids must have shape {tuple(expected_shape)} for {what}, "
                         f"got {tuple(target.shape)}")
    return target.reshape(-1).to(torch.int64).contiguous()


def ncd_view(t: Tensor, C: int) -> tuple[Tensor, Optional[tuple[int, ...]]]:
    """An (N, C, D) view of a (C) / (N, C) / (N, C, d1..dK) tensor without copying, and the order
    in which its spatial dims are flattened (None = natural order). Spatial dims are sorted by
    stride when that makes them mergeable (e.g. (N, C, H, W) after permuting H and W)."""
    if t.dim() == 1:
        return (t.view(1, C, 1) if t.stride(0) == 1 else t.unsqueeze(0).unsqueeze(-1)), None
    if t.dim() == 2:
        return t.unsqueeze(-1), None
    sp = list(range(2, t.dim()))
    D = math.prod(t.shape[2:])
    try:
        return t.view(t.shape[0], C, D), None
    except RuntimeError:
        pass
    order = sorted(sp, key=lambda d: -t.stride(d))
    perm = t.permute(0, 1, *order)
    try:
        return perm.view(t.shape[0], C, D), tuple(order)
    except RuntimeError:
        return t.reshape(t.shape[0], C, D), None  # not mergeable in any order: a copy


@dataclasses.dataclass(frozen=True)
class Canonical:
    """The logits as an (N, C, D) view, the target in kernel form, and how to give rows back."""
    x3: Tensor
    target: Tensor  # int64 (N*D,) ids, or a float (N, C, D) view of probabilities
    out_shape: tuple
    C: int
    perm: Optional[tuple[int, ...]]  # row order over the output dims (None: natural order)

    @property
    def soft(self) -> bool:
        return self.target.is_floating_point()

    def rows_to_output(self, rows: Tensor) -> Tensor:
        """Per-row values (N*D,) in the output's shape (undoing a spatial reordering)."""
        if self.perm is None:
            return rows.view(self.out_shape)
        inverse = sorted(range(len(self.perm)), key=lambda i: self.perm[i])
        return rows.view([self.out_shape[p] for p in self.perm]).permute(*inverse)


def canonical(input: Tensor, target: Tensor) -> Canonical:
    """Validate logits (C) / (N, C) / (N, C, d1..dK) and their target; no copy of the logits
    (unless their spatial dims cannot be merged in any order)."""
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError("input and target must be tensors")
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64 logits, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have shape (C), (N, C) or (N, C, d1, ..., dK); got a scalar")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    if C == 0:
        raise ValueError("input has no classes (C = 0)")
    x3, order = ncd_view(input, C)
    out_shape = tuple(input.shape[:1] + input.shape[2:]) if input.dim() > 1 else ()
    perm = None if order is None else (0, *[d - 1 for d in order])
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(f"class-probability target must have the input's shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
        t = target if order is None else target.permute(0, 1, *order)
        if t.dim() <= 2:
            t3, _ = ncd_view(t, C)
        else:
            t3 = t.reshape(t.shape[0], C, math.prod(t.shape[2:]))  # a view when mergeable, else a copy
        return Canonical(x3, t3, out_shape, C, perm)
    if target.shape != torch.Size(out_shape):
        raise ValueError(f"target of class ids must have shape {tuple(out_shape)} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    tgt = target if perm is None else target.permute(*perm)
    return Canonical(x3, class_ids(tgt, tgt.shape), out_shape, C, perm)


def check_linear_operands(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor],
                          target: Tensor) -> None:
    """Shapes, dtypes and devices of the linear head's operands (raises TypeError/ValueError)."""
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if input.dtype not in FLOAT_DTYPES:
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
                        "(no implicit promotion outside torch.autocast; cast one of them)")
    if linear_weight.device != input.device:
        raise ValueError(f"linear_weight is on {linear_weight.device} but input is on {input.device}")
    if linear_bias is not None:
        if not isinstance(linear_bias, Tensor):
            raise TypeError(f"linear_bias must be a tensor or None, got {type(linear_bias).__name__}")
        if linear_bias.shape != (C,):
            raise ValueError(f"linear_bias must have shape ({C},) (one per class), "
                             f"got {tuple(linear_bias.shape)}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias dtype {linear_bias.dtype} must match input dtype {input.dtype}")
        if linear_bias.device != input.device:
            raise ValueError(f"linear_bias is on {linear_bias.device} but input is on {input.device}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if target.is_floating_point():
        raise TypeError("linear_cross_entropy takes class-index targets (int64/int32/uint8); probability "
                        "targets are not supported")


def autocast_operands(input: Tensor, linear_weight: Tensor,
                      linear_bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Under ``torch.autocast`` the linear head's operands in the autocast dtype (as ``F.linear``
    would compute them): one cast of the weight per call (C*D*(2+4) bytes for fp32 -> bf16)."""
    dev = input.device.type
    try:
        enabled = torch.is_autocast_enabled(dev)
    except TypeError:  # pragma: no cover - torch < 2.4 has no device argument
        enabled = torch.is_autocast_enabled() if dev == "cuda" else torch.is_autocast_cpu_enabled()
    if not enabled or not all(t.is_floating_point() for t in (input, linear_weight)):
        return input, linear_weight, linear_bias
    try:
        dt = torch.get_autocast_dtype(dev)
    except AttributeError:  # pragma: no cover - torch < 2.4
        dt = torch.get_autocast_gpu_dtype() if dev == "cuda" else torch.get_autocast_cpu_dtype()
    def cast(t: Optional[Tensor]) -> Optional[Tensor]:
        return t if t is None or t.dtype == dt else t.to(dt)

    return cast(input), cast(linear_weight), cast(linear_bias)


# ---------------------------------------------------------------------------------- reduction
def check_token_weight(token_weight: Optional[Tensor], can: "Canonical") -> Optional[Tensor]:
    """Per-token weights of the target's shape as (R,) rows in the kernels' row order."""
    if token_weight is None:
        return None
    if not isinstance(token_weight, Tensor) or not token_weight.is_floating_point():
        raise TypeError("token_weight must be a floating-point tensor")
    if tuple(token_weight.shape) != tuple(can.out_shape):
        raise ValueError(f"token_weight must have the target's shape {tuple(can.out_shape)}, "
                         f"got {tuple(token_weight.shape)}")
    if token_weight.device != can.x3.device:
        raise ValueError(f"token_weight is on {token_weight.device} but input is on {can.x3.device}")
    tw = token_weight if can.perm is None else token_weight.permute(*can.perm)
    return tw.reshape(-1)
