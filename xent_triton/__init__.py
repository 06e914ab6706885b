"""xent_triton: fused, memory-lean cross-entropy for large vocabularies, in Triton."""
from .functional import cross_entropy
from .nn import CrossEntropyLoss
from .linear import LinearCrossEntropyLoss, linear_cross_entropy

__all__ = ["cross_entropy", "CrossEntropyLoss", "linear_cross_entropy", "LinearCrossEntropyLoss"]
__version__ = "0.1.0"
