"""``FusedLMHead``: an output layer whose forward computes the loss, so that FSDP2 works with the fused head.

FSDP2 (``fully_shard``) keeps a module's parameters sharded (``Shard(0)`` DTensors) outside its
forward and unshards them in its pre-forward hook; the gradient the head's backward produces is
then reduce-scattered by FSDP's post-backward hook, summed over the data-parallel ranks. A loss
that reads ``head.weight`` OUTSIDE the head's forward sees the sharded DTensor: ``full_tensor()``
there would all-gather it again, and its backward would keep only this rank's contribution
(no sum over the other ranks' tokens). So compute the loss INSIDE the forward: call
``head(input, target)``; the weight is then a plain unsharded tensor for the fused kernels.
Peak memory: one unsharded weight + its gradient (what the unsharded model holds), never N x C.

A ``Shard(0)`` weight DTensor passed to ``linear_cross_entropy`` with plain hidden states is this
mistake, and raises (``core.dtensor``).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..core.renames import renamed_keywords
from ..linear.functional import linear_cross_entropy


class FusedLMHead(nn.Module):
    """``nn.Linear(in_features, num_classes)`` whose forward returns the fused loss given labels.

    Args:
        in_features: hidden size D. num_classes: vocabulary size C.
        bias: add a (C,) bias. loss_options: defaults for ``linear_cross_entropy`` (ignore_index,
            reduction, label_smoothing, lse_square_scale, softcap, empty_batch, ...).

    ``forward(input (..., D), target (...) = None, **options)``: the loss (``linear_cross_entropy``
    of input, weight, target) when a target is given, else the logits (..., C). The old keywords
    ``hidden=`` / ``labels=`` still work, with a DeprecationWarning. ``bias`` and the attributes
    ``weight`` / ``bias`` are ``nn.Linear``'s (the head's matrix and bias, not class weights).

    Example:
        >>> head = FusedLMHead(64, 32000, ignore_index=-100)
        >>> fully_shard(head); fully_shard(model)           # FSDP2: the head is its own unit
        >>> loss = head(hidden, target)                      # weight unsharded here
        >>> loss.backward()                                  # FSDP reduce-scatters head.weight.grad
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = False,
                 device: Any = None, dtype: Optional[torch.dtype] = None, **loss_options: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_classes, device=device, dtype=dtype)) if bias else None
        self.loss_options = loss_options
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        if self.bias is not None:
            bound = 1 / self.weight.shape[1] ** 0.5
            nn.init.uniform_(self.bias, -bound, bound)

    @renamed_keywords(hidden="input", labels="target")
    def forward(self, input: Tensor, target: Optional[Tensor] = None,
                **options: Any) -> Union[Tensor, tuple[Any, ...]]:
        if target is None:
            return nn.functional.linear(input, self.weight, self.bias)
        return linear_cross_entropy(input, self.weight, target, linear_bias=self.bias,
                                    **{**self.loss_options, **options})
