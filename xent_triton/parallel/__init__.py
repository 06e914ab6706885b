"""Vocabulary (tensor) parallelism over torch.distributed: shard layout, cross-entropy, linear head,
DTensor inputs, and ``FusedLMHead`` (the fused head inside a module's forward, for FSDP2).

``FusedLMHead`` is loaded on first access: it sits above the public API (``parallel.fsdp`` imports
``linear.functional``, which imports this package), so importing it here would make a cycle.
"""
from typing import Any

__all__ = ["FusedLMHead"]


def __getattr__(name: str) -> Any:
    if name == "FusedLMHead":
        from .fsdp import FusedLMHead
        return FusedLMHead
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
