"""xent_triton: fused, memory-lean cross-entropy for large vocabularies, in Triton.

Public API: ``cross_entropy``, ``CrossEntropyLoss``, ``linear_cross_entropy``,
``LinearCrossEntropyLoss``, ``LossStats``; the KL family ``distillation_loss``,
``linear_distillation_loss``, ``token_logprobs``, ``linear_token_logprobs`` and their modules
``DistillationLoss``, ``LinearDistillationLoss``, ``TokenLogprobs``, ``LinearTokenLogprobs``;
custom ops under ``torch.ops.xent_triton``.
"""
from .core.options import LossStats
from .cross_entropy.functional import cross_entropy
from .cross_entropy.module import CrossEntropyLoss
from .kl.functional import distillation_loss, token_logprobs
from .kl.linear import linear_distillation_loss, linear_token_logprobs
from .kl.module import DistillationLoss, LinearDistillationLoss, LinearTokenLogprobs, TokenLogprobs
from .linear.functional import linear_cross_entropy
from .linear.module import LinearCrossEntropyLoss

__all__ = ["cross_entropy", "CrossEntropyLoss", "linear_cross_entropy", "LinearCrossEntropyLoss",
           "LossStats", "distillation_loss", "token_logprobs",
           "linear_distillation_loss", "linear_token_logprobs", "DistillationLoss", "LinearDistillationLoss",
           "TokenLogprobs", "LinearTokenLogprobs"]
__version__ = "0.3.0"
