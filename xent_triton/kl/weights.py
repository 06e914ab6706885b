"""Per-token weights of the KL family (``token_weight``): their validation, on one device and on
the vocabulary-parallel paths (where a rank's error is raised on every rank after the layout
exchange), and their product with per-token outputs (``reduce_tokens`` weighs losses).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor


def check_token_weight(token_weight: Optional[Tensor], shape, device: torch.device) -> Optional[Tensor]:
    """Per-position weights of the target's shape (the logits' leading shape) as (R,) rows; as the
    CE heads' ``token_weight`` (TypeError / ValueError naming it)."""
    if token_weight is None:
        return None
    if not isinstance(token_weight, Tensor) or not token_weight.is_floating_point():
        raise TypeError("token_weight must be a floating-point tensor")
    if tuple(token_weight.shape) != tuple(shape):
        raise ValueError(f"token_weight must have the target's shape {tuple(shape)}, "
                         f"got {tuple(token_weight.shape)}")
    if token_weight.device != device:
        raise ValueError(f"token_weight is on {token_weight.device} but input is on {device}")
    return token_weight.reshape(-1)


def parallel_token_weight(token_weight: Any, input: Any,
                          error: Optional[BaseException]) -> tuple[Optional[Tensor], Optional[BaseException]]:
    """``check_token_weight`` for the vocabulary-parallel paths: (rows, error) with this rank's
    validation error joined to ``error`` (raised on every rank after the layout exchange).
    ``input``: this rank's logits / hidden states (their leading shape = the tokens')."""
    if token_weight is None:
        return None, error
    try:
        return check_token_weight(token_weight, input.shape[:-1], input.device), error
    except (TypeError, ValueError, AttributeError) as e:
        return None, error or e


def weighted(values: tuple[Tensor, ...], tw: Optional[Tensor]) -> tuple[Tensor, ...]:
    """Per-token outputs times their ``token_weight`` (unchanged without one)."""
    return values if tw is None else tuple(v * tw.to(v.dtype) for v in values)


def weighted_outputs(res: Union[Tensor, tuple[Tensor, Tensor]],
                     tw: Optional[Tensor]) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``weighted`` of a log-probs result (a tensor, or the pair with the entropy), its shape kept."""
    if tw is None:
        return res
    outs = tuple(o * tw.to(o.dtype).view(o.shape) for o in (res if isinstance(res, tuple) else (res,)))
    return outs if isinstance(res, tuple) else outs[0]


def agree_token_weight(token_weight: Any) -> dict:
    """What the log-prob paths' ranks agree on about ``token_weight``: whether one was passed."""
    return dict(token_weight=float(token_weight is not None))
