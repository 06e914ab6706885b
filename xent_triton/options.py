"""One frozen options object for every loss, its validation, input canonicalisation and the
reduction. Carried unchanged from the public functions to the launchers (flattened to plain
scalars only where it crosses a ``torch.library`` op schema).

Validation never forces a value that ``torch.compile(dynamic=True)`` made symbolic: numeric
range checks run on plain Python numbers only.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .runtime import FLOAT_DTYPES, is_compiling

REDUCTIONS = ("none", "mean", "sum")
EMPTY_BATCH = ("nan", "zero")
TARGET_DTYPES = (torch.int64, torch.int32, torch.uint8)


def _symbolic(v) -> bool:
    return isinstance(v, (torch.SymFloat, torch.SymInt, torch.SymBool))


def _check_real(name: str, v, ok, requirement: str) -> None:
    """TypeError for a non-number (a tensor, a bool), ValueError when ``ok(v)`` fails; symbolic
    values (torch.compile dynamic=True) are not forced."""
    if isinstance(v, Tensor):  # a device value would need a host sync, or be silently frozen
        raise ValueError(f"{name} must be a finite Python float, got a tensor {v!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not _symbolic(v):
        raise TypeError(f"{name} must be a Python float, got {type(v).__name__}")
    if _symbolic(v):
        return
    # under dynamo a dynamic float is traced symbolically: math.isfinite cannot be traced, the
    # comparisons can (they become guards)
    finite = True if is_compiling() else math.isfinite(v)
    if not (finite and ok(v)):
        raise ValueError(f"{name} must be {requirement}, got {v!r}")


check_real = _check_real  # public: the KL family's options (kl/options.py) validate with it too


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
        _check_real("label_smoothing", label_smoothing, lambda v: 0 <= v <= 1, "in [0, 1]")
        _check_real("lse_square_scale", lse_square_scale, lambda v: True, "a finite Python float")
        _check_real("logit_scale", logit_scale, lambda v: True, "a finite Python float")
        if softcap is None:
            softcap = 0.0
        else:
            _check_real("softcap", softcap, lambda v: v > 0, "a positive finite float or None")
        return LossOptions(ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
                           logit_scale, empty_batch)

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

    def flat(self) -> tuple:
        """(ignore_index, label_smoothing, softcap, logit_scale): what crosses an op schema."""
        return (self.ignore_index, self.label_smoothing, self.softcap, self.logit_scale)

    @staticmethod
    def from_flat(ignore_index: int, label_smoothing: float, softcap: float,
                  logit_scale: float) -> "LossOptions":
        return LossOptions(ignore_index=ignore_index, label_smoothing=label_smoothing,
                           softcap=softcap, logit_scale=logit_scale)


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


def class_ids(target: Tensor, expected_shape, what: str = "input") -> Tensor:
    """Hard targets as contiguous int64 (R,) (int64, int32 and uint8 ids are accepted)."""
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"target must be int64/int32/uint8 class ids or float class probabilities, "
                        f"got {target.dtype}")
    if target.shape != expected_shape:
        raise ValueError(f"target of class ids must have shape {tuple(expected_shape)} for {what}, "
                         f"got {tuple(target.shape)}")
    return target.reshape(-1).to(torch.int64).contiguous()


def _ncd_view(t: Tensor, C: int) -> tuple[Tensor, Optional[tuple[int, ...]]]:
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
    x3, order = _ncd_view(input, C)
    out_shape = tuple(input.shape[:1] + input.shape[2:]) if input.dim() > 1 else ()
    perm = None if order is None else (0, *[d - 1 for d in order])
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(f"class-probability target must have the input's shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
        t = target if order is None else target.permute(0, 1, *order)
        if t.dim() <= 2:
            t3, _ = _ncd_view(t, C)
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


def loss_stats(target: Tensor, ent: Tensor, pred: Tensor, ignore_index: int, return_predicted: bool,
               to_output) -> LossStats:
    """LossStats from the forward's per-row entropy and argmax (O(rows) torch ops, no host sync).
    Soft targets: every row counts, and a row is correct when the argmax is the target's argmax."""
    if target.is_floating_point():
        valid = torch.ones(ent.shape, dtype=torch.bool, device=ent.device)
        label = target.argmax(1).reshape(-1)
    else:
        valid = target != ignore_index
        label = target
    n_valid = valid.sum()
    n_correct = ((pred == label) & valid).sum()
    entropy_sum = torch.where(valid, ent, torch.zeros_like(ent)).sum()
    return LossStats(n_valid, n_correct, entropy_sum, to_output(pred) if return_predicted else None)


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


def reduce_rows(loss_rows: Tensor, lse: Tensor, stats: Tensor, target: Tensor, opts: LossOptions,
                to_output, token_weight: Optional[Tensor] = None) -> Tensor:
    """Apply the z-loss and the reduction to per-row losses; no host sync.

    z-loss: ``lse_square_scale * lse**2`` per non-ignored token (soft targets: every row), added
    per token for ``none``, summed for ``sum``, and for ``mean`` averaged over the non-ignored
    tokens (independent of class weights), beside the cross-entropy's weighted mean
    ``sum_r loss_r / sum_r w_y`` (torch's denominator). ``empty_batch="zero"`` makes a mean with
    a zero denominator 0 (gradients 0, graph connected) instead of NaN. ``token_weight`` (R,)
    multiplies each token's loss (its z-loss too); ``mean`` then divides the cross-entropy by
    sum_r t_r w_y and the z-loss by the sum of t_r over the non-ignored tokens.
    """
    soft = target.is_floating_point()
    valid = None if soft else target != opts.ignore_index
    zl = opts.lse_square_scale
    zrows = None
    if zl != 0:
        lse_v = lse if valid is None else torch.where(valid, lse, torch.zeros_like(lse))
        zrows = zl * lse_v * lse_v
    tw = None
    if token_weight is not None:
        tw = token_weight.to(loss_rows.dtype)
        loss_rows = loss_rows * tw
        zrows = zrows * tw if zrows is not None else None
    if opts.reduction == "none":
        return to_output(loss_rows if zrows is None else loss_rows + zrows)
    if opts.reduction == "sum":
        return loss_rows.sum() if zrows is None else loss_rows.sum() + zrows.sum()
    if soft:
        den = torch.full((), float(loss_rows.shape[0]), dtype=loss_rows.dtype, device=loss_rows.device)
        den = den if tw is None else tw.sum()
        n_valid = den
    else:
        row_w = stats[:, 2].to(loss_rows.dtype)
        den = row_w.sum() if tw is None else (row_w * tw).sum()
        n_valid = valid.sum().to(loss_rows.dtype) if tw is None else torch.where(valid, tw, 0.0).sum()
    if opts.empty_batch == "zero":
        den = torch.where(den == 0, torch.ones_like(den), den)
        n_valid = torch.where(n_valid == 0, torch.ones_like(n_valid), n_valid)
    loss = loss_rows.sum() / den
    if zrows is not None:
        loss = loss + zrows.sum() / n_valid
    return loss
