"""The KL family's options: ``KLOptions``, the shared ``LossOptions`` with the KL family's fields
(one frozen object from the public function to the launch) and ``make_kl`` (its validation, the
shared options through ``LossOptions.make``). It crosses the KL custom ops as the CE heads' options
do: every field a keyword-only schema argument (``core/op_schema.options_op(...,
options_cls=KLOptions)``), ``**opts.flat()`` at the call, ``KLOptions.from_flat`` inside.

The KL family divides the logits by ``temperature``; the CE heads multiply by ``logit_scale``:
``logit_scale = 1 / temperature``. ``softcap`` (shared) caps the logits before the temperature.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..core.options import LossOptions, check_chunking, check_real

DIVERGENCES = ("kl", "reverse_kl", "jsd")  # a divergence's kernel id is its index


@dataclasses.dataclass(frozen=True)
class KLOptions(LossOptions):
    """``LossOptions`` (ignore_index, reduction, softcap, empty_batch as the CE heads) plus the KL
    family's own options; ``chunk_size`` 0 = automatic, ``has_token_weight``: a per-position
    weight tensor was passed (the tensor itself travels beside the options); ``accum_fp32``: the
    linear forms accumulate dW / db across token chunks in fp32 (float64 for float64), else in the
    head's own dtype (``grad_accum_dtype``, ``core/options.check_chunking``)."""

    divergence: str = "kl"
    beta: float = 0.5
    temperature: float = 1.0
    ce_weight: float = 0.0
    return_entropy: bool = False
    chunk_size: int = 0
    has_token_weight: bool = False
    accum_fp32: bool = True


def as_float(v):
    """A checked real as the kernels take it: a Python float (a symbolic value stays symbolic)."""
    return v if isinstance(v, (torch.SymFloat, torch.SymInt)) else float(v)


def make_kl(*, divergence: str = "kl", beta=0.5, temperature=1.0, ce_weight=0.0, has_target: bool = True,
            ignore_index=-100, reduction: str = "mean", empty_batch: str = "nan", softcap=None,
            return_entropy: bool = False, chunk_size=None, has_token_weight: bool = False,
            grad_accum_dtype=None, weight_dtype: Optional[torch.dtype] = None) -> KLOptions:
    """Validated options of the KL family (TypeError / ValueError naming the option); the shared
    ones through ``LossOptions.make``. Compile-safe as ``make``: symbolic values are not forced.
    ``grad_accum_dtype`` (the linear forms; ``weight_dtype``: their head's dtype) as the CE linear
    head's (``check_chunking``): None / float32 accumulate dW in fp32, the head's dtype in it."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    base = LossOptions.make(ignore_index=ignore_index, reduction=reduction, empty_batch=empty_batch,
                            softcap=softcap)
    check_real("temperature", temperature, lambda v: v > 0, "a positive finite float")
    if divergence == "jsd":
        check_real("beta", beta, lambda v: 0 < v < 1,
                   "in (0, 1) for jsd (use divergence='kl' or 'reverse_kl' for the endpoints)")
    check_real("ce_weight", ce_weight, lambda v: 0 <= v <= 1, "in [0, 1]")
    if ce_weight != 0 and not has_target:
        raise ValueError("ce_weight > 0 needs target (the hard-label cross-entropy's class ids)")
    chunk, accum_fp32 = check_chunking(chunk_size, grad_accum_dtype, weight_dtype or torch.float32)
    return KLOptions(ignore_index=base.ignore_index, reduction=base.reduction, softcap=base.softcap,
                     empty_batch=base.empty_batch, divergence=divergence, beta=as_float(beta),
                     temperature=as_float(temperature), ce_weight=as_float(ce_weight),
                     return_entropy=bool(return_entropy), chunk_size=chunk,
                     has_token_weight=bool(has_token_weight), accum_fp32=accum_fp32)

