"""torchtitan 0.3.0's loss contract: ``loss_fn(pred, labels, global_valid_tokens=None, **kwargs)
-> (loss, metrics)``.

As torchtitan 0.3.0's ``components/loss.py`` ``BaseLoss.__call__`` / ``CrossEntropyLoss``: the trainer
calls ``loss_fn(pred, labels, global_valid_tokens, **loss_kwargs)`` (``positions=`` among them; extra
keyword arguments are accepted and ignored, as torchtitan's own loss does) and gets ``SUM /
global_valid_tokens``; the validator (``components/validate.py``) calls ``loss_fn(pred, labels)`` and
divides the returned token SUM by the token count itself, so without ``global_valid_tokens`` the loss
is the SUM over valid tokens. ``pred``: (B, S, C) logits, a plain tensor or a DTensor sharded on the
vocabulary (``Shard(-1)``: the vocabulary-parallel path runs on that mesh dim's group, no logits are
gathered); ``labels``: (B, S) class ids with ``ignore_index`` (-100, torchtitan's IGNORE_INDEX).

Selecting it as torchtitan 0.3.0 selects a loss: ``Trainer.Config(loss=XentCrossEntropyLoss.Config())``
(or as the ``loss_fn`` of ``ChunkedLossWrapper.Config``, the llama3 registry's default);
``XentCrossEntropyLoss`` subclasses torchtitan's ``BaseLoss`` and exists only when torchtitan is
importable (built on first access; importing this module does not import torchtitan); like
torchtitan's own ``CrossEntropyLoss`` it returns no metrics (``ChunkedLossWrapper`` rejects metric
keys without a /mean, /frac, /max or /min suffix).

Metrics of the plain callable (detached device tensors, no host sync; ``loss_metrics/`` naming):
``loss_metrics/local_loss_sum`` and ``loss_metrics/local_valid_tokens`` over the same tokens (a
DTensor ``pred`` with labels as a DTensor on the same mesh, a (data, tensor) mesh included: the whole
DTensor batch for both; plain labels: this rank's), ``loss_metrics/global_valid_tokens`` (the divisor).
Communication per call: that of ``cross_entropy`` (O(tokens) with a sharded vocabulary), nothing more.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..core.dtensor import is_dtensor
from ..cross_entropy.functional import cross_entropy

METRIC_PREFIX = "loss_metrics/"


def _plain(t: Any) -> Any:
    """A replicated DTensor's local value (identical on every rank), anything else unchanged."""
    return t.to_local() if is_dtensor(t) else t


def _full(t: Any) -> Any:
    """A DTensor's global value (a Partial sum all-reduced: every rank of its mesh calls this alike)."""
    return t.full_tensor() if is_dtensor(t) else t


class CrossEntropyLoss:
    """torchtitan 0.3.0's loss call; options are ``xent_triton.cross_entropy``'s (label_smoothing,
    lse_square_scale, softcap, logit_scale, ...).

    Example:
        >>> loss_fn = CrossEntropyLoss(ignore_index=-100, lse_square_scale=1e-4)
        >>> loss, metrics = loss_fn(pred, labels, global_valid_tokens=n_tokens)   # pred (B, S, C)
        >>> loss.backward()
        >>> loss_sum, _ = loss_fn(pred, labels)   # the validator's call: the token SUM
    """

    def __init__(self, ignore_index: int = -100, **options: Any) -> None:
        if "reduction" in options:
            raise ValueError("the torchtitan loss reduces itself (local sum / global valid tokens)")
        self.ignore_index = ignore_index
        self.options = options

    def __call__(self, pred: Tensor, labels: Tensor,
                 global_valid_tokens: Optional[Union[Tensor, int, float]] = None,
                 **kwargs: Any) -> tuple[Tensor, dict]:
        del kwargs  # e.g. positions=: torchtitan's trainer passes them to every loss
        logits = pred.flatten(0, -2)  # (B*S, C); a DTensor view keeps the vocabulary sharding
        y = labels.flatten()
        local_sum = _plain(cross_entropy(logits, y, ignore_index=self.ignore_index, reduction="sum",
                                         **self.options))
        # counted over the tokens the sum covers: a DTensor label's count is over its whole batch
        n_local = _full((y != self.ignore_index).sum())
        if global_valid_tokens is None:  # the validator's call: the SUM (it divides by the count itself)
            loss, den = local_sum, None
        else:
            den = torch.as_tensor(_plain(global_valid_tokens), device=local_sum.device).to(local_sum.dtype)
            loss = local_sum / torch.where(den == 0, torch.ones_like(den), den)
        metrics = {METRIC_PREFIX + "local_loss_sum": local_sum.detach(),
                   METRIC_PREFIX + "local_valid_tokens": n_local}
        if den is not None:
            metrics[METRIC_PREFIX + "global_valid_tokens"] = den.detach()
        return loss, metrics


def cross_entropy_loss(pred: Tensor, labels: Tensor,
                       global_valid_tokens: Optional[Union[Tensor, int, float]] = None, **kwargs: Any
                       ) -> tuple[Tensor, dict]:
    """``CrossEntropyLoss()(pred, labels, global_valid_tokens)`` with the defaults (ignore_index=-100).

    Example:
        >>> loss, metrics = cross_entropy_loss(pred, labels, global_valid_tokens=torch.tensor(4096))
    """
    return CrossEntropyLoss()(pred, labels, global_valid_tokens, **kwargs)


TESTED_TORCHTITAN = "0.3.0"


def _titan_loss_class() -> type:
    """``XentCrossEntropyLoss``: a torchtitan ``BaseLoss`` with its ``Config`` (torchtitan imported here)."""
    from dataclasses import dataclass

    from torchtitan.components.loss import BaseLoss

    class XentCrossEntropyLoss(BaseLoss):
        """xent's cross-entropy as a torchtitan 0.3.0 loss:
        ``Trainer.Config(loss=XentCrossEntropyLoss.Config())``.

        ``compile_config`` is accepted and not used (the loss is a fused kernel already)."""

        @dataclass(kw_only=True, slots=True)
        class Config(BaseLoss.Config):
            ignore_index: int = -100
            label_smoothing: float = 0.0
            lse_square_scale: float = 0.0
            softcap: Optional[float] = None
            logit_scale: float = 1.0

        def __init__(self, config: Config, *, compile_config: Any = None):
            self.config = config
            self.impl = CrossEntropyLoss(
                ignore_index=config.ignore_index, label_smoothing=config.label_smoothing,
                lse_square_scale=config.lse_square_scale, softcap=config.softcap,
                logit_scale=config.logit_scale)

        def __call__(self, pred: Tensor, labels: Tensor, global_valid_tokens: Optional[Tensor] = None,
                     **kwargs: Any) -> tuple[Tensor, dict]:
            # no metrics, as torchtitan's own CrossEntropyLoss: ChunkedLossWrapper only combines keys
            # ending in /mean, /frac, _mean, _frac, /max, /min (normalised per chunk), which raw sums are not
            return self.impl(pred, labels, global_valid_tokens, **kwargs)[0], {}

    XentCrossEntropyLoss.__module__ = __name__
    XentCrossEntropyLoss.__qualname__ = "XentCrossEntropyLoss"
    return XentCrossEntropyLoss


_LAZY: dict = {}


def __getattr__(name: str) -> Any:
    if name == "XentCrossEntropyLoss":
        if name not in _LAZY:
            try:
                _LAZY[name] = _titan_loss_class()
            except ImportError as e:
                raise AttributeError(f"XentCrossEntropyLoss needs torchtitan (tested {TESTED_TORCHTITAN}): "
                                     f"{e}") from None
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CrossEntropyLoss", "cross_entropy_loss", "METRIC_PREFIX", "TESTED_TORCHTITAN"]
