"""xent_triton: fused, memory-lean cross-entropy for large vocabularies, in Triton."""
from .functional import cross_entropy
from .nn import CrossEntropyLoss

__all__ = ["cross_entropy", "CrossEntropyLoss"]
__version__ = "0.1.0"
