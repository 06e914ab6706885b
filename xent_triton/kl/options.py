"""The KL family's options: ``KLOptions``, the shared ``LossOptions`` with the KL family's fields
(one frozen object from the public function to the launch), ``make_kl`` (its validation, the
shared options through ``LossOptions.make``) and ``kl_flat`` / ``kl_from_flat`` (the one place
where it is flattened to, and rebuilt from, a custom op's scalars).

The KL family divides the logits by ``temperature``; the CE heads multiply by ``logit_scale``:
``logit_scale = 1 / temperature``. ``softcap`` (shared) caps the logits before the temperature.
"""
from __future__ import annotations

import dataclasses

import torch

from ..core.options import LossOptions, check_real

DIVERGENCES = ("kl", "reverse_kl", "jsd")  # a divergence's kernel id is its index


@dataclasses.dataclass(frozen=True)
class KLOptions(LossOptions):
    """``LossOptions`` (ignore_index, reduction, softcap, empty_batch as the CE heads) plus the KL
    family's own options; ``chunk_size`` 0 = automatic, ``has_token_weight``: a per-position
    weight tensor was passed (the tensor itself travels beside the options)."""

    divergence: str = "kl"
    beta: float = 0.5
    temperature: float = 1.0
    ce_weight: float = 0.0
    return_entropy: bool = False
    chunk_size: int = 0
    has_token_weight: bool = False


def as_float(v):
    """A checked real as the kernels take it: a Python float (a symbolic value stays symbolic)."""
    return v if isinstance(v, (torch.SymFloat, torch.SymInt)) else float(v)


def make_kl(*, divergence: str = "kl", beta=0.5, temperature=1.0, ce_weight=0.0, has_target: bool = True,
            ignore_index=-100, reduction: str = "mean", empty_batch: str = "nan", softcap=None,
            return_entropy: bool = False, chunk_size=None, has_token_weight: bool = False) -> KLOptions:
    """Validated options of the KL family (TypeError / ValueError naming the option); the shared
    ones through ``LossOptions.make``. Compile-safe as ``make``: symbolic values are not forced."""
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
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return KLOptions(ignore_index=base.ignore_index, reduction=base.reduction, softcap=base.softcap,
                     empty_batch=base.empty_batch, divergence=divergence, beta=as_float(beta),
                     temperature=as_float(temperature), ce_weight=as_float(ce_weight),
                     return_entropy=bool(return_entropy), chunk_size=int(chunk_size or 0),
                     has_token_weight=bool(has_token_weight))


def kl_flat(opts: KLOptions, names: tuple[str, ...]) -> tuple:
    """The options ``names`` as plain scalars, in that order: what crosses a KL custom-op schema
    (the divergence as its index in DIVERGENCES)."""
    return tuple(DIVERGENCES.index(opts.divergence) if n == "divergence" else getattr(opts, n)
                 for n in names)


def kl_from_flat(names: tuple[str, ...], values) -> KLOptions:
    """The inverse of ``kl_flat`` inside a custom op (the other fields at their defaults)."""
    kw = dict(zip(names, values))
    if "divergence" in kw:
        kw["divergence"] = DIVERGENCES[kw["divergence"]]
    return KLOptions(**kw)
