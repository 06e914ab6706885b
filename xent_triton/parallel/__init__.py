"""Adapters above the op packages: ``FusedLMHead`` runs the fused linear head inside a module's
forward, where FSDP2 has gathered the head's weight."""
from .fsdp import FusedLMHead

__all__ = ["FusedLMHead"]
