"""Logits path: a drop-in for transformers' ``ForCausalLMLoss`` and the ``LOSS_MAPPING`` patch."""
from __future__ import annotations

import sys
from typing import Any, Optional

from torch import Tensor

import xent_triton

from .hf_common import NumItems, divide_by_items, next_token_targets


def causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch: NumItems = None,
                   ignore_index: int = -100, shift_labels: Optional[Tensor] = None, *,
                   return_stats: bool = False):
    """``ForCausalLMLoss`` with an optional ``xent_triton.LossStats`` of the same pass: ``(loss, stats)``."""
    targets = next_token_targets(labels, shift_labels, ignore_index)
    x = logits.reshape(-1, vocab_size)  # a view for contiguous logits: no copy, no .float()
    y = targets.reshape(-1).to(x.device)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"the logits hold {x.shape[0]} positions but the labels {y.shape[0]}: with logits_to_keep, "
            "pass shift_labels aligned with the kept positions (or logits_to_keep=0 to train on all)")
    reduction = "sum" if num_items_in_batch is not None else "mean"
    stats_kw = {"return_stats": True} if return_stats else {}
    out = xent_triton.cross_entropy(x, y, ignore_index=ignore_index, reduction=reduction, empty_batch="zero",
                                    **stats_kw)
    loss, stats = out if return_stats else (out, None)
    if num_items_in_batch is not None:
        loss = divide_by_items(loss, num_items_in_batch)
    return (loss, stats) if return_stats else loss


def ForCausalLMLoss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch: NumItems = None,
                    ignore_index: int = -100, shift_labels: Optional[Tensor] = None,
                    **kwargs: Any) -> Tensor:
    """transformers' ``ForCausalLMLoss`` (same signature and semantics) by ``xent_triton.cross_entropy``.

    Args:
        logits: (B, T, V) (any float dtype; read as is, no float32 copy), or any shape with
            ``numel = rows * vocab_size``.
        labels: (B, T) token ids, ``ignore_index`` where no loss is wanted. Shifted inside (position t
            predicts ``labels[:, t + 1]``) unless ``shift_labels`` is given.
        vocab_size: V.
        num_items_in_batch: the number of non-ignored targets of the whole accumulated batch (int or
            tensor, moved to the loss's device): the loss is then ``sum / num_items_in_batch``; else the
            mean over this batch's non-ignored targets (0, not NaN, when there are none; a count of 0
            divides by 1).
        ignore_index: label of the positions without loss.
        shift_labels: (B, T) targets already aligned with the logits (context / sequence parallelism).
        **kwargs: swallowed, as transformers does.

    Returns:
        The float32 scalar loss.

    Example:
        >>> from xent_triton.integrations import transformers as xhf
        >>> logits = torch.randn(2, 5, 100, requires_grad=True)
        >>> labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
        >>> xhf.ForCausalLMLoss(logits, labels, vocab_size=100, num_items_in_batch=6).backward()
    """
    return causal_lm_loss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels)


# (mapping or module, key or attribute name, original function) of every replaced entry
_PATCHED: list[tuple[Any, str, Any]] = []


def patch_loss_functions() -> list[str]:
    """Replace transformers' ``ForCausalLMLoss`` by :func:`ForCausalLMLoss` everywhere it is looked up.

    Every ``LOSS_MAPPING`` entry whose function *is* transformers' ``ForCausalLMLoss`` (found by
    identity: today ``ForCausalLM``, ``ForConditionalGeneration``, ``CsmForConditionalGeneration``),
    and every loaded ``transformers.*`` module attribute bound to it, including
    ``transformers.trainer.ForCausalLMLoss``: the Trainer compares ``LOSS_MAPPING[loss_type]`` with it
    to count ``num_items_in_batch`` over the shifted labels, which must stay true. Models read
    ``LOSS_MAPPING`` on each forward, so existing instances switch too (unless they set their own
    ``loss_function``). Idempotent.

    Returns:
        The ``LOSS_MAPPING`` keys now served by xent.

    Example:
        >>> xhf.patch_loss_functions()
        ['ForCausalLM', 'ForConditionalGeneration', 'CsmForConditionalGeneration']
    """
    from transformers.loss import loss_utils

    original = _original()
    if not _PATCHED:
        for key, fn in list(loss_utils.LOSS_MAPPING.items()):
            if fn is original:
                _PATCHED.append((loss_utils.LOSS_MAPPING, key, fn))
                loss_utils.LOSS_MAPPING[key] = ForCausalLMLoss
        for name, mod in list(sys.modules.items()):
            if mod is not None and (name == "transformers" or name.startswith("transformers.")) and \
                    vars(mod).get("ForCausalLMLoss") is original:
                _PATCHED.append((mod, "ForCausalLMLoss", original))
                setattr(mod, "ForCausalLMLoss", ForCausalLMLoss)
    return [k for m, k, _ in _PATCHED if m is loss_utils.LOSS_MAPPING]


def unpatch_loss_functions() -> None:
    """Undo :func:`patch_loss_functions` (no-op when not patched), also in modules loaded since."""
    original = _original()
    while _PATCHED:
        where, key, fn = _PATCHED.pop()
        if isinstance(where, dict):
            where[key] = fn
        else:
            setattr(where, key, fn)
    for name, mod in list(sys.modules.items()):
        if mod is not None and (name == "transformers" or name.startswith("transformers.")) and \
                vars(mod).get("ForCausalLMLoss") is ForCausalLMLoss:
            setattr(mod, "ForCausalLMLoss", original)


def _original():
    """transformers' own ``ForCausalLMLoss`` (also while patched)."""
    from transformers.loss import loss_utils

    for where, key, fn in _PATCHED:
        if where is loss_utils:
            return fn
    return loss_utils.ForCausalLMLoss


def is_patched() -> bool:
    """Whether :func:`patch_loss_functions` is in force."""
    return bool(_PATCHED)


__all__ = ["ForCausalLMLoss", "causal_lm_loss", "patch_loss_functions", "unpatch_loss_functions"]
