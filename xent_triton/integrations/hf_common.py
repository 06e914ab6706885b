"""Helpers shared by the logits path, the fused head and the TRL head (no framework import here)."""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

NumItems = Union[int, float, Tensor, None]


def next_token_targets(labels: Tensor, shift_labels: Optional[Tensor], ignore_index: int) -> Tensor:
    """The target of every position, as transformers' ``ForCausalLMLoss`` builds it.

    Without ``shift_labels``: ``labels`` (B, T) padded on the right with ``ignore_index`` and shifted
    left by one, so position t predicts ``labels[:, t + 1]`` and the last position is ignored (same
    shape as ``labels``; no copy of the hidden states or logits is needed). With ``shift_labels``
    (already aligned, e.g. under context parallelism): returned as is.
    """
    if shift_labels is not None:
        return shift_labels
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def divide_by_items(loss: Tensor, num_items_in_batch: NumItems) -> Tensor:
    """``loss / num_items_in_batch`` (an int, float or tensor, moved to the loss's device).

    A count of 0 (every token of the accumulated batch ignored, so the summed loss is 0 too) divides
    by 1: the result is a differentiable 0 rather than 0 / 0 = NaN. No host sync for a tensor count.
    """
    if torch.is_tensor(num_items_in_batch):
        n = num_items_in_batch.to(loss.device)
        return loss / torch.where(n == 0, torch.ones_like(n), n)
    return loss / (num_items_in_batch if num_items_in_batch != 0 else 1)


def full_tensor(t: Optional[Tensor]) -> Optional[Tensor]:
    """A DTensor (FSDP2-sharded parameter) gathered to a plain tensor; anything else unchanged."""
    if t is None:
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t


def head_operands(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], *, fp32: bool = False,
                  like_hidden: bool = False):
    """Hidden states, LM-head weight and bias in the one dtype the head's matmul would use.

    Under autocast that is the autocast dtype (what ``nn.Linear`` computes in), with ``fp32`` float32,
    else the weight's dtype (the hidden states' with ``like_hidden``, as TRL's head does). Returns
    ``(hidden, weight, bias, ctx)`` where ``ctx`` disables autocast
    around the fused call (its operands are already cast; the casts carry the gradients back).
    """
    weight, bias = full_tensor(weight), full_tensor(bias)
    dev = hidden.device.type
    autocast = torch.is_autocast_enabled(dev)
    if fp32:
        dt = torch.float32
    elif autocast:
        dt = torch.get_autocast_dtype(dev)
    else:
        dt = hidden.dtype if like_hidden else weight.dtype
    ctx = torch.autocast(dev, enabled=False) if (autocast or fp32) else contextlib.nullcontext()
    def cast(t: Optional[Tensor]) -> Optional[Tensor]:
        return t if t is None or t.dtype == dt else t.to(dt)

    return cast(hidden), cast(weight), cast(bias), ctx
