"""``LinearCrossEntropyLoss``: the module form of ``linear_cross_entropy``."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..core.loss_module import LossModule
from ..core.options import check_chunking
from .functional import linear_cross_entropy


class LinearCrossEntropyLoss(LossModule):
    """Module form of :func:`linear_cross_entropy`, every argument of it: the per-call tensors in
    ``forward(input, linear_weight, target, linear_bias=None, token_weight=None)``, the others in the
    constructor. ``weight`` (class weights) is a registered buffer; ``return_stats`` /
    ``return_predicted`` add the ``LossStats`` output as in the functional form. ``chunk_size`` and
    a ``grad_accum_dtype`` that is not a floating dtype fail at construction; whether
    ``grad_accum_dtype`` fits the head's dtype is checked at the call (it depends on ``linear_weight``).

    Example:
        >>> crit = LinearCrossEntropyLoss(ignore_index=-100, lse_square_scale=1e-4)
        >>> loss = crit(torch.randn(8, 64), torch.randn(1000, 64), torch.randint(0, 1000, (8,)))
    """

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, *,
                 lse_square_scale: float = 0.0, softcap: Optional[float] = None,
                 logit_scale: float = 1.0, return_lse: bool = False, process_group: Any = None,
                 vocab_start_index: Optional[int] = None, reduce_input_grad: bool = True,
                 empty_batch: str = "nan", chunk_size: Optional[int] = None,
                 grad_accum_dtype: Optional[torch.dtype] = None, return_stats: bool = False,
                 return_predicted: bool = False) -> None:
        check_chunking(chunk_size, None, torch.float32)
        # the head's dtype is not known yet: any floating dtype may fit it (checked again at the call)
        if grad_accum_dtype is not None and not (isinstance(grad_accum_dtype, torch.dtype)
                                                 and grad_accum_dtype.is_floating_point):
            raise ValueError("grad_accum_dtype must be None, torch.float32 or linear_weight's dtype, got "
                             f"{grad_accum_dtype!r}")
        super().__init__(weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                         softcap=softcap, logit_scale=logit_scale, return_lse=return_lse,
                         process_group=process_group,  # vocabulary parallelism (docs/distributed.md)
                         vocab_start_index=vocab_start_index, reduce_input_grad=reduce_input_grad,
                         empty_batch=empty_batch, chunk_size=chunk_size,
                         grad_accum_dtype=grad_accum_dtype, return_stats=return_stats,
                         return_predicted=return_predicted)

    def forward(self, input: Tensor, linear_weight: Tensor, target: Tensor,
                linear_bias: Optional[Tensor] = None, token_weight: Optional[Tensor] = None,
                ) -> Union[Tensor, tuple[Any, ...]]:
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                    token_weight=token_weight, **self.options())
