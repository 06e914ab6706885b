"""A torchtune-style fused SFT loss: ``set_model_output(model)`` then ``loss(hidden, targets)``.

No import of torchtune. Like torchtune's ``LinearCrossEntropyLoss`` (an ``SFTLoss``): the recipe
calls ``loss_fn.set_model_output(model)``, which sets ``model.skip_output_layer = True`` (the model
then returns its final hidden states) and keeps the output projection; ``loss_fn(outputs, targets)``
computes the cross-entropy of ``outputs @ W.T`` with the fused head, never forming the logits.
``targets`` are already shifted by the recipe; ``ignore_index`` tokens do not count; the result is
the mean over valid tokens (``empty_batch="zero"``: a fully masked batch gives 0, not NaN).

The projection: a module with ``.weight`` (``nn.Linear``, ``FusedLMHead``) or torchtune's
``TiedLinear`` (``.tied_module.weight``). Under FSDP2 the projection's weight is a sharded DTensor
outside its forward: wrap the output layer in ``xent_triton.parallel.FusedLMHead`` and compute the
loss in its forward instead (docs/distributed.md); a sharded weight with plain hidden states
raises. Under tensor parallelism (weight ``Shard(0)``, hidden states a replicated DTensor) the
vocabulary-parallel head runs.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..linear.functional import linear_cross_entropy


def _projection_weight(proj: Any) -> tuple[Tensor, Any]:
    if hasattr(proj, "tied_module"):
        return proj.tied_module.weight, None
    if hasattr(proj, "weight"):
        return proj.weight, getattr(proj, "bias", None)
    raise TypeError(f"the model's output projection {type(proj).__name__} has no weight")


class LinearCrossEntropyLoss(nn.Module):
    """torchtune-style ``SFTLoss`` with the fused linear head.

    Example:
        >>> loss_fn = LinearCrossEntropyLoss(ignore_index=-100)
        >>> loss_fn.set_model_output(model)          # model.skip_output_layer = True
        >>> hidden = model(tokens)                   # (B, S, D)
        >>> loss = loss_fn(hidden, labels)           # labels (B, S), already shifted
    """

    def __init__(self, ignore_index: int = -100, **options: Any) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.options = {"empty_batch": "zero", **options}
        self.linear_projection = None

    def set_model_output(self, model: nn.Module) -> None:
        """Skip the model's output layer and keep it for the loss (torchtune's contract)."""
        model.skip_output_layer = True
        self.linear_projection = model.output

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``outputs`` (B, S, D) final hidden states, ``targets`` (B, S) -> scalar mean loss."""
        if self.linear_projection is None:
            raise RuntimeError("call set_model_output(model) first")
        weight, bias = _projection_weight(self.linear_projection)
        return linear_cross_entropy(outputs, weight, targets, linear_bias=bias,
                                    ignore_index=self.ignore_index, **self.options)


__all__ = ["LinearCrossEntropyLoss"]
