"""``torch.nn`` modules over the functional API."""
from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor

from ..core.loss_module import LossModule
from .functional import cross_entropy


class CrossEntropyLoss(LossModule):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` backed by the fused kernels.

    Every argument of :func:`xent_triton.cross_entropy`: the per-call tensors in ``forward(input,
    target, token_weight=None)``, the others in the constructor (the extras keyword-only). ``weight``
    is a registered buffer, so it follows ``.to(device)``; ``return_stats`` / ``return_predicted``
    add the ``LossStats`` output as in the functional form.

    Example:
        >>> crit = CrossEntropyLoss(ignore_index=-100, label_smoothing=0.1, lse_square_scale=1e-4)
        >>> loss = crit(torch.randn(4, 1000), torch.randint(0, 1000, (4,)))
    """

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, *,
                 lse_square_scale: float = 0.0, softcap: Optional[float] = None,
                 logit_scale: float = 1.0, inplace_backward: bool = False,
                 return_lse: bool = False, empty_batch: str = "nan", return_stats: bool = False,
                 return_predicted: bool = False, process_group: Any = None,
                 vocab_start_index: Optional[int] = None) -> None:
        super().__init__(weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                         softcap=softcap, logit_scale=logit_scale, inplace_backward=inplace_backward,
                         return_lse=return_lse, empty_batch=empty_batch, return_stats=return_stats,
                         return_predicted=return_predicted,
                         process_group=process_group,  # vocabulary parallelism (docs/distributed.md)
                         vocab_start_index=vocab_start_index)

    def forward(self, input: Tensor, target: Tensor,
                token_weight: Optional[Tensor] = None) -> Union[Tensor, tuple[Any, ...]]:
        return cross_entropy(input, target, token_weight=token_weight, **self.options())
