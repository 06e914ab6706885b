"""``LossModule``: the shared body of the ``torch.nn`` loss modules (``CrossEntropyLoss``,
``LinearCrossEntropyLoss``): validate the loss options once at construction, keep ``weight`` as a
registered buffer (it follows ``.to(device)``), keep every other keyword as an attribute of the
same name, and hand them all back to the functional form in ``forward``.

``renamed_keywords``: a renamed argument's old keyword keeps working, with a ``DeprecationWarning``
naming the new one (README, "Renamed arguments")."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, TypeVar

import torch
from torch import Tensor

from .options import LossOptions

VALIDATED = tuple(inspect.signature(LossOptions.make).parameters)  # the options LossOptions.make checks

F = TypeVar("F", bound=Callable[..., Any])


class LossModule(torch.nn.Module):
    """Subclasses call ``super().__init__(weight, **their keyword arguments)`` and read them back
    with ``self.options()`` (``weight`` included)."""

    def __init__(self, weight: Optional[Tensor], **options: Any) -> None:
        super().__init__()
        LossOptions.make(**{k: v for k, v in options.items() if k in VALIDATED})  # errors here, early
        self.register_buffer("weight", weight)
        self.option_names = tuple(options)
        for name, value in options.items():
            setattr(self, name, value)

    def options(self) -> dict[str, Any]:
        """The keyword arguments of the functional form, from the current attributes."""
        return {"weight": self.weight, **{name: getattr(self, name) for name in self.option_names}}

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, lse_square_scale={self.lse_square_scale}, "
                f"softcap={self.softcap}, logit_scale={self.logit_scale}")
