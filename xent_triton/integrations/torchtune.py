"""A torchtune fused SFT loss: ``set_model_output(model)`` then ``loss(hidden, targets)``.

No import of torchtune here. Two contracts:

* torchtune's development branch (``SFTLoss`` in ``torchtune/modules/loss/loss_types.py``, not in a
  release): recipes call ``loss_fn.set_model_output(model)`` only when ``isinstance(loss_fn, SFTLoss)``
  and compile it with ``loss_fn.apply_compile_strategy(...)``. When that ``SFTLoss`` is importable (and
  torchtune already imported), constructing this loss registers it as a virtual subclass of it
  (``SFTLoss`` is an ABC); ``apply_compile_strategy`` compiles ``forward`` and returns the loss.
  ``set_model_output`` sets ``model.skip_output_layer = True`` (the model then returns its final
  hidden states) and keeps the output projection.
* torchtune 0.6.1 (the current release): the model has no ``skip_output_layer`` and its recipes never
  call ``set_model_output``: build the model with :func:`output_skipped` in the YAML (the loss then
  finds its projection; docs/distributed.md), or call ``set_model_output(model)`` yourself. On such a
  model either makes the output layer return its input (an instance-level ``forward`` on an
  ``nn.Linear``, a pass-through in place of a ``TiedLinear``; the state dict is unchanged), so the
  recipe's ``logits`` are the hidden states (upcast to fp32 by the model; cast back to the weight's
  dtype here, exactly).

``loss_fn(outputs, targets)`` computes the cross-entropy of ``outputs @ W.T`` with the fused head,
never forming the logits. ``targets`` are already shifted by the recipe; ``ignore_index`` tokens do
not count; the result is the mean over valid tokens (``empty_batch="zero"``: a fully masked batch
gives 0, not NaN), as ``CEWithChunkedOutputLoss``.

The projection: a module with ``.weight`` (``nn.Linear``, ``FusedLMHead``) or torchtune's
``TiedLinear`` (``.tied_module.weight``). Under FSDP2 the projection's weight is a sharded DTensor
outside its forward: wrap the output layer in ``xent_triton.parallel.FusedLMHead`` and compute the
loss in its forward instead (docs/distributed.md); a sharded weight with plain hidden states
raises. Under tensor parallelism (weight ``Shard(0)``, hidden states a replicated DTensor) the
vocabulary-parallel head runs.
"""
from __future__ import annotations

import importlib
import sys
import weakref
from typing import Any

from torch import Tensor, nn

from ..linear.functional import linear_cross_entropy


def _projection_weight(proj: Any) -> tuple[Tensor, Any]:
    if hasattr(proj, "tied_module"):
        return proj.tied_module.weight, None
    if hasattr(proj, "weight"):
        return proj.weight, getattr(proj, "bias", None)
    raise TypeError(f"the model's output projection {type(proj).__name__} has no weight")


class _PassThrough:
    """An output layer's stand-in that returns its input (picklable; keeps ``tied_module`` for the loss)."""

    def __init__(self, tied_module: Any = None):
        self.tied_module = tied_module

    def __call__(self, x: Tensor) -> Tensor:
        return x


def register_with_sft_loss(cls: type, sft_loss: Any = None) -> bool:
    """Make ``cls`` a virtual subclass of ``sft_loss`` (default: torchtune's development-branch
    ``SFTLoss``, looked up only when torchtune is already imported); False when there is none."""
    if sft_loss is None:
        if "torchtune" not in sys.modules:
            return False
        try:
            from torchtune.modules.loss.loss_types import SFTLoss as sft_loss
        except ImportError:  # torchtune 0.6.1 has no SFTLoss
            return False
    if not issubclass(cls, sft_loss):
        sft_loss.register(cls)
    return True


_BUILT: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models built by output_skipped, still alive


def _skip_output(model: nn.Module) -> Any:
    """Make ``model`` return its final hidden states; returns its output projection."""
    proj = model.output
    if hasattr(model, "skip_output_layer"):
        model.skip_output_layer = True
    elif isinstance(proj, nn.Module):
        proj.forward = _PassThrough()
    else:  # TiedLinear (not a module): a pass-through that keeps the tied module
        model.output = _PassThrough(proj.tied_module)
    return proj


def output_skipped(builder: str, **kwargs: Any) -> nn.Module:
    """A torchtune model built by ``builder`` (a dotted path) whose output layer is skipped: the YAML-only
    use in torchtune 0.6.1's recipes, with :class:`LinearCrossEntropyLoss` as the loss::

        model:
          _component_: xent_triton.integrations.torchtune.output_skipped
          builder: torchtune.models.llama3_2.llama3_2_1b
        loss:
          _component_: xent_triton.integrations.torchtune.LinearCrossEntropyLoss

    The loss finds the projection of the model built this way (one such model alive per process; with
    several, call ``loss_fn.set_model_output(model)``). The state dict is unchanged (checkpoints load).
    """
    module, _, name = builder.rpartition(".")
    model = getattr(importlib.import_module(module), name)(**kwargs)
    # not a registered submodule (nn.Module.__setattr__ would add "_xent_projection.*" to the state dict)
    object.__setattr__(model, "_xent_projection", _skip_output(model))
    _BUILT.add(model)
    return model


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
        register_with_sft_loss(type(self))

    def set_model_output(self, model: nn.Module) -> None:
        """Skip the model's output layer and keep it for the loss (torchtune's contract; on a model without
        ``skip_output_layer``, torchtune 0.6.1's, the output layer passes its input through)."""
        proj = getattr(model, "_xent_projection", None)  # already skipped by output_skipped
        self.linear_projection = proj if proj is not None else _skip_output(model)

    def apply_compile_strategy(self, *args: Any, **kwargs: Any) -> "LinearCrossEntropyLoss":
        """torchtune's development-branch ``SFTLoss`` hook: ``torch.compile`` the forward; returns self."""
        import torch

        self.forward = torch.compile(self.forward, *args, **kwargs)
        return self

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``outputs`` (..., D) final hidden states, ``targets`` (...) -> scalar mean loss."""
        if self.linear_projection is None:
            built = list(_BUILT)
            if len(built) != 1:
                raise RuntimeError("call set_model_output(model) first (or build the model with "
                                   f"output_skipped: {len(built)} such models are alive)")
            self.linear_projection = built[0]._xent_projection
        if isinstance(outputs, (list, tuple)):
            raise TypeError("the fused loss takes the hidden states, not chunked logits: do not combine it "
                            "with set_num_output_chunks / CEWithChunkedOutputLoss")
        weight, bias = _projection_weight(self.linear_projection)
        if outputs.dtype != weight.dtype:  # torchtune 0.6.1's model upcasts its output to fp32
            outputs = outputs.to(weight.dtype)
        return linear_cross_entropy(outputs, weight, targets, linear_bias=bias,
                                    ignore_index=self.ignore_index, **self.options)


TESTED_TORCHTUNE = "0.6.1"

__all__ = ["LinearCrossEntropyLoss", "TESTED_TORCHTUNE", "register_with_sft_loss", "output_skipped"]
