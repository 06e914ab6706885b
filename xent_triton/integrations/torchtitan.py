"""A torchtitan-style loss: ``loss_fn(pred, labels, global_valid_tokens=None) -> (loss, metrics)``.

No import of torchtitan. ``pred``: (B, S, C) logits, a plain tensor or a DTensor sharded on the
vocabulary (``Shard(-1)`` on the "tp" mesh under torchtitan's loss parallel: the vocabulary-parallel
path runs on that mesh dim's group, no logits are gathered); ``labels``: (B, S) class ids with
``ignore_index`` for padding. The loss is this rank's SUM over its valid tokens divided by
``global_valid_tokens`` (the number of valid tokens of the whole global batch: all data-parallel
ranks and gradient-accumulation micro-batches), or by the local count when not given (a local
mean). Summed over ranks and micro-batches, the losses are the exact global token mean, whatever
the padding: a fully padded rank contributes 0 (``empty_batch="zero"`` for the local mean).

Metrics (detached device tensors, no host sync; keys in torchtitan's ``loss_metrics/`` naming):
``loss_metrics/local_loss_sum``, ``loss_metrics/local_valid_tokens``,
``loss_metrics/global_valid_tokens``.
Communication per call: that of ``cross_entropy`` (O(tokens) with a sharded vocabulary), nothing more.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..cross_entropy.functional import cross_entropy
from ..parallel.dtensor import is_dtensor

METRIC_PREFIX = "loss_metrics/"


def _plain(t: Any) -> Any:
    """A replicated DTensor's local value (identical on every rank), anything else unchanged."""
    return t.to_local() if is_dtensor(t) else t


class CrossEntropyLoss:
    """torchtitan-style callable; options are ``xent_triton.cross_entropy``'s (label_smoothing,
    lse_square_scale, softcap, logit_scale, ...).

    Example:
        >>> loss_fn = CrossEntropyLoss(ignore_index=-100, lse_square_scale=1e-4)
        >>> loss, metrics = loss_fn(pred, labels, global_valid_tokens=n_tokens)   # pred (B, S, C)
        >>> loss.backward()
    """

    def __init__(self, ignore_index: int = -100, **options: Any) -> None:
        if "reduction" in options:
            raise ValueError("the torchtitan loss reduces itself (local sum / global valid tokens)")
        self.ignore_index = ignore_index
        self.options = options

    def __call__(self, pred: Tensor, labels: Tensor,
                 global_valid_tokens: Optional[Union[Tensor, int, float]] = None) -> tuple[Tensor, dict]:
        logits = pred.flatten(0, -2)  # (B*S, C); a DTensor view keeps the vocabulary sharding
        y = _plain(labels).flatten()
        local_sum = _plain(cross_entropy(logits, y, ignore_index=self.ignore_index, reduction="sum",
                                         **self.options))
        n_local = (y != self.ignore_index).sum()
        given = global_valid_tokens
        den = (n_local if given is None else torch.as_tensor(given, device=y.device)).to(local_sum.dtype)
        loss = local_sum / torch.where(den == 0, torch.ones_like(den), den)
        metrics = {METRIC_PREFIX + "local_loss_sum": local_sum.detach(),
                   METRIC_PREFIX + "local_valid_tokens": n_local,
                   METRIC_PREFIX + "global_valid_tokens": den.detach()}
        return loss, metrics


def cross_entropy_loss(pred: Tensor, labels: Tensor,
                       global_valid_tokens: Optional[Union[Tensor, int, float]] = None
                       ) -> tuple[Tensor, dict]:
    """``CrossEntropyLoss()(pred, labels, global_valid_tokens)`` with the defaults (ignore_index=-100).

    Example:
        >>> loss, metrics = cross_entropy_loss(pred, labels, global_valid_tokens=torch.tensor(4096))
    """
    return CrossEntropyLoss()(pred, labels, global_valid_tokens)


__all__ = ["CrossEntropyLoss", "cross_entropy_loss", "METRIC_PREFIX"]
