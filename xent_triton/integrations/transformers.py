"""xent_triton for Hugging Face transformers and TRL.

``from xent_triton.integrations import transformers as xhf``


* Logits path: :func:`ForCausalLMLoss` (transformers' own signature and semantics) and
  :func:`patch_loss_functions` / :func:`unpatch_loss_functions` (every ``LOSS_MAPPING`` entry that is
  transformers' ``ForCausalLMLoss``).
* Fused head: :func:`apply` / :func:`revert` on one model instance: the training loss from the final
  hidden states with ``xent_triton.linear_cross_entropy``, logits never materialised.
* Trainer: :func:`fused_trainer` (one line: the fused head, and ``mean_token_accuracy`` / ``entropy`` logged
  from the loss's own pass).
* TRL: :func:`add_fused_lm_head` (TRL 1.16's contract) and :func:`patch_trl` / :func:`unpatch_trl`.

Normalisation everywhere: ``sum / num_items_in_batch`` when the trainer passes it (gradient
accumulation; a count of 0 divides by 1), else the mean over this batch's valid targets; a batch
with no valid target gives 0 with zero gradients (``empty_batch="zero"``), never NaN.
Needs the ``[hf]`` extra (transformers >= 5; TRL >= 1.16 for the TRL part). See docs/integrations.md.
"""
from __future__ import annotations

from .hf_fused import TESTED_ARCHITECTURES, apply, fused_causal_lm_loss, is_applied, revert
from .hf_loss import ForCausalLMLoss, is_patched, patch_loss_functions, unpatch_loss_functions
from .hf_trainer import fused_trainer
from .hf_trl import TRL_VERSIONS, FusedCausalLMOutput, add_fused_lm_head, patch_trl, unpatch_trl

__all__ = [
    "ForCausalLMLoss", "patch_loss_functions", "unpatch_loss_functions", "is_patched",
    "apply", "revert", "is_applied", "fused_causal_lm_loss", "TESTED_ARCHITECTURES", "fused_trainer",
    "add_fused_lm_head", "FusedCausalLMOutput", "patch_trl", "unpatch_trl", "TRL_VERSIONS",
]
