"""``torch.nn`` modules of the KL family, named as ``CrossEntropyLoss`` / ``LinearCrossEntropyLoss``:
``DistillationLoss``, ``LinearDistillationLoss``, ``TokenLogprobs``, ``LinearTokenLogprobs``.

Each takes every non-tensor option of its function as a constructor keyword (validated there, so a
bad value fails at construction), keeps it as an attribute of the same name, and passes it back to
the function in ``forward``; per-call tensors (logits or hidden states, heads and their biases, target ids)
are ``forward`` arguments.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..core.renames import renamed_keywords
from .functional import distillation_loss, token_logprobs
from .linear import linear_distillation_loss, linear_token_logprobs
from .names import LINEAR_DISTILL, LINEAR_LOGPROBS, LOGITS, LOGPROBS
from .options import make_kl


class OptionsModule(torch.nn.Module):
    """Keeps the keyword options as attributes; ``options()`` hands them back."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.option_names = tuple(options)
        for name, value in options.items():
            setattr(self, name, value)

    def options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.option_names}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in self.option_names if k != "process_group")


def accum(grad_accum_dtype: Any) -> dict:
    """``make_kl``'s keywords checking ``grad_accum_dtype`` at construction: a dtype that is not a
    floating one fails here; whether it fits the head's dtype is checked at the call (it depends on
    ``linear_weight``), as ``LinearCrossEntropyLoss``."""
    floating = isinstance(grad_accum_dtype, torch.dtype) and grad_accum_dtype.is_floating_point
    return dict(grad_accum_dtype=grad_accum_dtype, weight_dtype=grad_accum_dtype if floating else None)


class _Distill(OptionsModule):
    def __init__(self, divergence: str, beta: float, temperature: float, ignore_index: int, reduction: str,
                 ce_weight: float, empty_batch: str, softcap: Optional[float], **more: Any) -> None:
        make_kl(divergence=divergence, beta=beta, temperature=temperature, ce_weight=ce_weight,
                ignore_index=ignore_index, reduction=reduction, empty_batch=empty_batch, softcap=softcap,
                chunk_size=more.get("chunk_size"), **accum(more.get("grad_accum_dtype")))
        super().__init__(divergence=divergence, beta=beta, temperature=temperature, ignore_index=ignore_index,
                         reduction=reduction, ce_weight=ce_weight, empty_batch=empty_batch, softcap=softcap,
                         **more)


class DistillationLoss(_Distill):
    """Module form of :func:`distillation_loss`; ``forward(input, teacher_input, target=None)``.

    Example:
        >>> crit = DistillationLoss(divergence="jsd", beta=0.3, temperature=2.0)
        >>> loss = crit(torch.randn(4, 32000), torch.randn(4, 32000))
    """

    def __init__(self, divergence: str = "kl", beta: float = 0.5, temperature: float = 1.0,
                 ignore_index: int = -100, reduction: str = "mean", ce_weight: float = 0.0, *,
                 empty_batch: str = "nan", softcap: Optional[float] = None, process_group: Any = None,
                 vocab_start_index: Optional[int] = None) -> None:
        super().__init__(divergence, beta, temperature, ignore_index, reduction, ce_weight, empty_batch,
                         softcap,
                         process_group=process_group, vocab_start_index=vocab_start_index)

    @renamed_keywords(**LOGITS)
    def forward(self, input: Tensor, teacher_input: Tensor, target: Optional[Tensor] = None,
                token_weight: Optional[Tensor] = None) -> Tensor:
        return distillation_loss(input, teacher_input, target, token_weight=token_weight, **self.options())


class LinearDistillationLoss(_Distill):
    """Module form of :func:`linear_distillation_loss`; ``forward(input, linear_weight,
    teacher_input, teacher_linear_weight, target=None, linear_bias=None, teacher_linear_bias=None)``.

    Example:
        >>> crit = LinearDistillationLoss(divergence="reverse_kl", chunk_size=1024)
        >>> loss = crit(torch.randn(8, 64), torch.randn(1000, 64), torch.randn(8, 96), torch.randn(1000, 96))
    """

    def __init__(self, divergence: str = "kl", beta: float = 0.5, temperature: float = 1.0,
                 ignore_index: int = -100, reduction: str = "mean", ce_weight: float = 0.0, *,
                 empty_batch: str = "nan", softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                 grad_accum_dtype: Optional[torch.dtype] = None, process_group: Any = None,
                 vocab_start_index: Optional[int] = None) -> None:
        super().__init__(divergence, beta, temperature, ignore_index, reduction, ce_weight, empty_batch,
                         softcap,
                         chunk_size=chunk_size, grad_accum_dtype=grad_accum_dtype,
                         process_group=process_group,
                         vocab_start_index=vocab_start_index)

    @renamed_keywords(**LINEAR_DISTILL)
    def forward(self, input: Tensor, linear_weight: Tensor, teacher_input: Tensor,
                teacher_linear_weight: Tensor, target: Optional[Tensor] = None,
                linear_bias: Optional[Tensor] = None, teacher_linear_bias: Optional[Tensor] = None,
                token_weight: Optional[Tensor] = None) -> Tensor:
        return linear_distillation_loss(input, linear_weight, teacher_input, teacher_linear_weight, target,
                                        linear_bias=linear_bias, teacher_linear_bias=teacher_linear_bias,
                                        token_weight=token_weight, **self.options())


class TokenLogprobs(OptionsModule):
    """Module form of :func:`token_logprobs`; ``forward(input, target)``.

    Example:
        >>> lp, ent = TokenLogprobs(temperature=0.7, return_entropy=True)(torch.randn(2, 5, 1000),
        ...                                                               torch.randint(0, 1000, (2, 5)))
    """

    def __init__(self, temperature: float = 1.0, return_entropy: bool = False, *, ignore_index: int = -100,
                 softcap: Optional[float] = None, process_group: Any = None,
                 vocab_start_index: Optional[int] = None) -> None:
        make_kl(temperature=temperature, softcap=softcap, ignore_index=ignore_index)
        super().__init__(temperature=temperature, return_entropy=return_entropy, ignore_index=ignore_index,
                         softcap=softcap, process_group=process_group, vocab_start_index=vocab_start_index)

    @renamed_keywords(**LOGPROBS)
    def forward(self, input: Tensor, target: Tensor,
                token_weight: Optional[Tensor] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
        return token_logprobs(input, target, token_weight=token_weight, **self.options())


class LinearTokenLogprobs(OptionsModule):
    """Module form of :func:`linear_token_logprobs`; ``forward(input, linear_weight, target,
    linear_bias=None)``.

    Example:
        >>> lp = LinearTokenLogprobs(temperature=0.7)(torch.randn(2, 5, 64), torch.randn(1000, 64),
        ...                                           torch.randint(0, 1000, (2, 5)))
    """

    def __init__(self, temperature: float = 1.0, return_entropy: bool = False, *, ignore_index: int = -100,
                 softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                 grad_accum_dtype: Optional[torch.dtype] = None, process_group: Any = None,
                 vocab_start_index: Optional[int] = None) -> None:
        make_kl(temperature=temperature, softcap=softcap, ignore_index=ignore_index, chunk_size=chunk_size,
                **accum(grad_accum_dtype))
        super().__init__(temperature=temperature, return_entropy=return_entropy, ignore_index=ignore_index,
                         softcap=softcap,
                         chunk_size=chunk_size, grad_accum_dtype=grad_accum_dtype,
                         process_group=process_group,
                         vocab_start_index=vocab_start_index)

    @renamed_keywords(**LINEAR_LOGPROBS)
    def forward(self, input: Tensor, linear_weight: Tensor, target: Tensor,
                linear_bias: Optional[Tensor] = None,
                token_weight: Optional[Tensor] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
        return linear_token_logprobs(input, linear_weight, target, linear_bias=linear_bias,
                                     token_weight=token_weight, **self.options())
