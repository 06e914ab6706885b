"""One frozen options object for every loss and its validation. Carried unchanged from the public
functions to the launchers; flattened only where it crosses a ``torch.library`` op schema, by
``LossOptions.flat`` (inverse: ``LossOptions.from_flat``; the schema side: ``core/op_schema.py``).

Validation never forces a value that ``torch.compile(dynamic=True)`` made symbolic: numeric
range checks run on plain Python numbers only.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

REDUCTIONS = ("none", "mean", "sum")


EMPTY_BATCH = ("nan", "zero")


def _symbolic(v) -> bool:
    return isinstance(v, (torch.SymFloat, torch.SymInt, torch.SymBool))


def check_real(name: str, v, ok, requirement: str) -> None:
    """TypeError for a non-number (a tensor, a bool), ValueError when ``ok(v)`` fails; symbolic
    values (torch.compile dynamic=True) are not forced."""
    if isinstance(v, Tensor):  # a device value would need a host sync, or be silently frozen
        raise ValueError(f"{name} must be a finite Python float, got a tensor {v!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not _symbolic(v):
        raise TypeError(f"{name} must be a Python float, got {type(v).__name__}")
    if _symbolic(v):
        return
    # comparisons, not math.isfinite: dynamo traces them (on a float it traces symbolically they
    # become guards); NaN fails both
    finite = -math.inf < v < math.inf
    if not (finite and ok(v)):
        raise ValueError(f"{name} must be {requirement}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The scalar options of a loss. ``softcap`` 0.0 means no softcap."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    softcap: float = 0.0
    logit_scale: float = 1.0
    empty_batch: str = "nan"

    @staticmethod
    def make(*, ignore_index=-100, reduction: str = "mean", label_smoothing=0.0,
             lse_square_scale=0.0, softcap=None, logit_scale=1.0,
             empty_batch: str = "nan") -> "LossOptions":
        """Validated options (TypeError / ValueError with the option's name)."""
        if ignore_index is None:  # torch.nn.functional.linear_cross_entropy's default: -100
            ignore_index = -100
        if isinstance(ignore_index, bool) or (not isinstance(ignore_index, int)
                                              and not _symbolic(ignore_index)):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if empty_batch not in EMPTY_BATCH:
            raise ValueError(f"empty_batch must be one of {EMPTY_BATCH}, got {empty_batch!r}")
        check_real("label_smoothing", label_smoothing, lambda v: 0 <= v <= 1, "in [0, 1]")
        check_real("lse_square_scale", lse_square_scale, lambda v: True, "a finite Python float")
        check_real("logit_scale", logit_scale, lambda v: True, "a finite Python float")
        if softcap is None:
            softcap = 0.0
        else:
            check_real("softcap", softcap, lambda v: v > 0, "a positive finite float or None")
        return LossOptions(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                           lse_square_scale=lse_square_scale, softcap=softcap, logit_scale=logit_scale,
                           empty_batch=empty_batch)

    @property
    def has_smoothing(self) -> bool:
        return self.label_smoothing > 0

    @property
    def has_softcap(self) -> bool:
        return self.softcap > 0

    def kernel_scalars(self) -> dict:
        """The runtime scalars every row kernel takes, by keyword."""
        return dict(ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                    softcap=self.softcap, logit_scale=self.logit_scale)

    def flat(self) -> dict[str, Any]:
        """Every field by name: the one form in which the options cross a custom-op schema (its
        keyword-only arguments, ``core/op_schema.py``); ``from_flat(**flat())`` is ``self``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_flat(cls, **fields: Any) -> "LossOptions":
        """The options an op received as its keyword-only arguments (``flat``'s inverse)."""
        return cls(**fields)


def make_options(deferred: bool, **kwargs) -> tuple[LossOptions, Optional[BaseException]]:
    """``LossOptions.make(**kwargs)``; ``deferred`` (a process group or DTensor operands): a
    validation error is returned instead of raised (defaults stand in), so that this rank still
    enters the options agreement and every rank raises together there: one rank's bad option must
    not leave the others waiting."""
    if not deferred:
        return LossOptions.make(**kwargs), None
    try:
        return LossOptions.make(**kwargs), None
    except (TypeError, ValueError) as e:
        return LossOptions(), e


def check_chunking(chunk_size, grad_accum_dtype, weight_dtype: torch.dtype) -> tuple[int, bool]:
    """The linear head's ``chunk_size`` (0 = automatic) and whether dW accumulates in fp32 (None /
    torch.float32; float64 weights in float64) or in ``weight_dtype``; ValueError otherwise.
    Every path validates them (one device, ``process_group``, DTensor), before any collective."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if grad_accum_dtype is not None and not (isinstance(grad_accum_dtype, torch.dtype)
                                             and grad_accum_dtype in (torch.float32, weight_dtype)):
        raise ValueError(f"grad_accum_dtype must be None, torch.float32 or linear_weight.dtype "
                         f"({weight_dtype}), got {grad_accum_dtype!r}")
    fp32 = grad_accum_dtype in (None, torch.float32) or weight_dtype in (torch.float32, torch.float64)
    return int(chunk_size or 0), fp32


class LossStats(NamedTuple):
    """Metrics from the loss's own pass (raw sums of device tensors, all-reducible).

    n_valid: number of non-ignored tokens; n_correct: tokens whose argmax equals the target;
    entropy_sum: sum over non-ignored tokens of the entropy of softmax(z) (after logit_scale and
    softcap); predicted: the argmax per token (int64, the target's shape) when asked, else None.
    """

    n_valid: Tensor
    n_correct: Tensor
    entropy_sum: Tensor
    predicted: Optional[Tensor]

