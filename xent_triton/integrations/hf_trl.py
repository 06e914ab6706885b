"""TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, TRL 1.16) computed by xent's kernels.

Same call (``model(..., labels=labels, fused_lm_head=True)``), same :class:`FusedCausalLMOutput` fields,
masks and normalisation, same softcap / logit-scale reading of the config, as TRL 1.16's version.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import types
import warnings
from typing import Optional

import torch
from torch import Tensor
from transformers.utils import ModelOutput

import xent_triton

from ..core.formulas_torch import transform_logits
from ..core.row_blocks import softmax_entropy_argmax
from ..kl.linear import linear_logprobs_rows
from ..kl.options import make_kl
from .hf_common import divide_by_items, head_operands

OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
TRL_VERSIONS = ">=1.16,<1.17"  # the contract this module copies (tested with TRL 1.16.0)
_FALLBACK_ROWS = 1 << 22  # elements of a (rows, V) tile in the pure-torch fallbacks below


@dataclasses.dataclass
class FusedCausalLMOutput(ModelOutput):
    """TRL 1.16's ``FusedCausalLMOutput``: per-token fields of shape (B, T - 1) ((B, T) with
    ``shift_labels``), zero where the label is -100; those not asked for in ``outputs`` are None.
    ``loss`` = -sum(log_probs) / (num_items_in_batch or the number of valid labels), plus
    ``router_aux_loss_coef * aux_loss`` when router logits are requested."""

    loss: Optional[Tensor] = None
    log_probs: Optional[Tensor] = None
    entropy: Optional[Tensor] = None
    log_sum_sq_probs: Optional[Tensor] = None
    mean_logits: Optional[Tensor] = None
    is_top1: Optional[Tensor] = None
    label_mask: Optional[Tensor] = None
    aux_loss: Optional[Tensor] = None


def _transform(x: Tensor, softcap: Optional[float], scale: float) -> Tensor:
    return transform_logits(x.float(), scale, softcap if softcap is not None else 0.0)


def _entropy_rows(h: Tensor, w: Tensor, b: Optional[Tensor], softcap: Optional[float],
                  scale: float) -> Tensor:
    return softmax_entropy_argmax(_transform(torch.nn.functional.linear(h, w, b), softcap, scale), False)[0]


def _chunked_entropy(h, w, b, softcap, scale) -> Tensor:
    """Per-token entropy under a softcap, differentiable, one (rows, V) tile at a time (checkpointed)."""
    from torch.utils.checkpoint import checkpoint

    rows = max(1, _FALLBACK_ROWS // w.shape[0])
    parts = [checkpoint(_entropy_rows, h[i:i + rows], w, b, softcap, scale, use_reentrant=False)
             for i in range(0, h.shape[0], rows)]
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def _mean_logits(h, w, b, softcap, scale) -> Tensor:
    if softcap is None:  # linear: the vocabulary mean of a * (h W^T + b) is a * (h mean(W) + mean(b))
        m = h.float() @ w.float().mean(0)
        return scale * (m + b.float().mean() if b is not None else m)
    rows = max(1, _FALLBACK_ROWS // w.shape[0])
    return torch.cat([_transform(torch.nn.functional.linear(h[i:i + rows], w, b), softcap, scale).mean(-1)
                      for i in range(0, h.shape[0], rows)] + [h.new_zeros(0, dtype=torch.float32)])


def one_pass(h: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, temperature: float, entropy: bool,
             softcap: Optional[float] = None):
    """``(log_probs, entropy or None, lse, is_top1)`` (N,) of the logits ``T(h @ w.T + b) / temperature``
    (``T`` the softcap ``softcap tanh(x / softcap)``, or none) at the targets ``y`` from ONE pass over the
    vocabulary (backward: one more, the recompute).

    The op behind ``xent_triton.linear_token_logprobs`` also returns each row's (max, log-sum) of the
    scaled logits, which that function drops: they give the lse (``max + log_sum``) and ``is_top1``
    without a second pass. The op forms ``log_prob = (z_y - max) - log_sum``, so ``z_y == max`` (the
    target is a maximum) gives exactly ``-log_sum``; a target below the maximum by less than half a unit
    in the last place of ``log_sum`` (|gap| < 6e-8 * log_sum, inside the logits' own rounding) and a
    target tied exactly with an earlier class also count as top-1 (``argmax`` / TRL: not for the tie).
    log_probs and entropy are differentiable; lse and is_top1 are not.
    """

    x, tok = h.reshape(-1, h.shape[-1]), y.reshape(-1).to(torch.int64).contiguous()
    opts = make_kl(temperature=float(temperature), return_entropy=bool(entropy), softcap=softcap)
    lp, ent, stats = linear_logprobs_rows(x, w, b, tok, opts)
    log_sum = stats[:, 1]
    return lp, (ent if entropy else None), stats[:, 0] + log_sum, lp.detach() == -log_sum


def per_token(h: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, temperature: float,
              softcap: Optional[float], logit_scale: float, outputs: tuple[str, ...]):
    """``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` (N,) of the logits
    ``z = softcap * tanh(logit_scale * (h @ w.T + b) / softcap) / temperature`` at the targets ``y`` (N,),
    all valid; a field not in ``outputs`` is None (log_probs always). log_probs and entropy are
    differentiable, the others are not.

    Passes over the vocabulary in the forward (what SFT / GRPO / RLOO ask for: log_probs, entropy,
    is_top1): one, with or without a softcap (:func:`one_pass`); ``log_sum_sq_probs`` adds one (lse(2 z)),
    ``mean_logits`` with a softcap one (a logit scale <= 0: -CE per token, the entropy in checkpointed
    tiles and the argmax from ``LossStats.predicted``).
    """
    t = float(temperature)
    scale, cap = float(logit_scale) / t, (None if softcap is None else float(softcap) / t)
    want_entropy = "entropy" in outputs
    top1, sq = "is_top1" in outputs, "log_sum_sq_probs" in outputs
    entropy = log_sum_sq = mean_logits = is_top1 = lse = None
    if logit_scale > 0:
        # softcap tanh(a x / softcap) / t == S tanh(x / S) / T with S = softcap / a, T = t / a (a > 0): the
        # log-prob head's own softcap before its temperature, one pass (``one_pass``)
        a = float(logit_scale)
        log_probs, entropy, lse, is_top1 = one_pass(h, w, b, y, t / a, want_entropy,
                                                    None if softcap is None else float(softcap) / a)
        is_top1 = is_top1 if top1 else None
    else:  # a non-positive logit scale: -CE per token, the entropy in checkpointed tiles
        res = -xent_triton.linear_cross_entropy(h, w, y, linear_bias=b, reduction="none", softcap=cap,
                                                logit_scale=scale)
        if want_entropy:
            res = (res, _chunked_entropy(h, w, b, cap, scale))
        log_probs, entropy = res if want_entropy else (res, None)
        if top1 or sq:
            with torch.no_grad():
                stats_kw = {"return_stats": True, "return_predicted": True} if top1 else {}
                out = xent_triton.linear_cross_entropy(
                    h, w, y, linear_bias=b, reduction="none", softcap=cap, logit_scale=scale, return_lse=sq,
                    **stats_kw)
                if top1:
                    is_top1 = out[-1].predicted.reshape(-1) == y
                lse = out[1] if sq else None
    if sq:  # log sum_v p_v^2 = lse(2 z) - 2 lse(z); 2 z has twice the scale and the softcap
        with torch.no_grad():
            lse2 = xent_triton.linear_cross_entropy(
                h, w, y, linear_bias=b, reduction="none", softcap=None if cap is None else 2 * cap,
                logit_scale=2 * scale, return_lse=True)[1]
            log_sum_sq = lse2.float() - 2 * lse.float()
    if "mean_logits" in outputs:
        mean_logits = _mean_logits(h, w, b, cap, scale)
    return (log_probs.float(), None if entropy is None else entropy.float(), log_sum_sq, mean_logits, is_top1)


def _config_transform(text_config) -> tuple[Optional[float], float]:
    """(final_logit_softcapping, logit_scale) read from the config exactly as TRL 1.16 reads them."""
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        s = text_config.logits_scaling
        scale = s if text_config.model_type == "hyperclovax" else 1 / s
    return softcap, (1.0 if scale is None else scale)


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """TRL 1.16's ``add_fused_lm_head``, computed by xent_triton: same call, fields, masks, normalisation.

    After it, ``model(..., labels=labels, fused_lm_head=True)`` runs the backbone and returns a
    :class:`FusedCausalLMOutput` instead of logits: per-token (B, T - 1) fields (``labels[:, 1:]`` are
    the targets; with ``shift_labels`` (B, T) as given) scored only where the label is not -100 and
    zero elsewhere: ``log_probs`` (always; differentiable), ``entropy`` (differentiable),
    ``log_sum_sq_probs``, ``mean_logits``, ``is_top1`` (no gradient), each only when listed in
    ``outputs``; ``label_mask``; ``loss = -log_probs.sum() / n`` with ``n = num_items_in_batch`` or the
    number of valid labels (at least 1; a ``num_items_in_batch`` of 0 also divides by 1); the MoE
    ``aux_loss`` (Mixtral's load balancing), added to the loss times ``router_aux_loss_coef``, when
    router logits are requested. Logits are ``softcap * tanh(logit_scale * x / softcap) / temperature``
    with TRL's reading of the config (``final_logit_softcapping``; ``logit_scale``,
    ``output_multiplier``, ``lm_head_multiplier``, ``1 / logits_scaling``). Without
    ``fused_lm_head=True`` the forward is the original. Add the head before wrapping with PEFT.

    Args:
        model: a transformers causal LM (its ``base_model`` is the backbone).
        temperature: the logits are divided by it.
        cast_lm_head_to_fp32: run the head in float32 outside autocast.
        outputs: the per-token fields to compute, among "log_probs", "entropy", "log_sum_sq_probs",
            "mean_logits", "is_top1".

    Example:
        >>> xhf.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
        >>> out = model(input_ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        >>> out.log_probs.shape  # (B, T - 1)
    """
    bad = set(outputs) - set(OPTIONAL_OUTPUTS) - {"log_probs"}
    if bad:
        raise ValueError(f"unknown outputs {sorted(bad)}; choose among log_probs, "
                         f"{', '.join(OPTIONAL_OUTPUTS)}")
    original_forward = model.forward
    text_config = model.config.get_text_config()
    softcap, logit_scale = _config_transform(text_config)

    @functools.wraps(type(model).forward)  # keeps the signature that generate() validates kwargs against
    def _fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                       num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for k, v in (("labels", labels), ("shift_labels", shift_labels),
                         ("num_items_in_batch", num_items_in_batch)):
                if v is not None:
                    kwargs[k] = v
            return original_forward(*args, **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels (or shift_labels)")
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = self.base_model(*args, **kwargs)  # looked up per call: FSDP / PEFT replace it
        if shift_labels is None:
            hidden_states, labels = backbone_outputs.last_hidden_state[:, :-1], labels[:, 1:]
        else:
            hidden_states, labels = backbone_outputs.last_hidden_state, shift_labels
        lm_head = self.get_output_embeddings()
        hidden_states = hidden_states.to(lm_head.weight.device)
        labels = labels.to(lm_head.weight.device)
        mask = labels != -100
        h, w, b, ctx = head_operands(hidden_states[mask], lm_head.weight, lm_head.bias,
                                     fp32=cast_lm_head_to_fp32, like_hidden=True)
        with ctx:
            fields = per_token(h, w, b, labels[mask], temperature, softcap, logit_scale, outputs)
        # masked_scatter keeps the outputs connected to the model even when no label is valid
        fields = [None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in fields]
        log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = fields
        n = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = divide_by_items(-log_probs.sum(), n)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _aux_loss(self, text_config, backbone_outputs, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy,
                                   log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits,
                                   is_top1=is_top1, label_mask=mask, aux_loss=aux_loss)

    model.forward = types.MethodType(_fused_forward, model)


def _aux_loss(model, text_config, backbone_outputs, attention_mask) -> Tensor:
    """Mixtral's load-balancing loss of the router logits, with TRL 1.16's reading of the expert counts."""
    import transformers
    from packaging.version import Version
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None)
    if text_config.model_type == "gpt_oss" and Version(transformers.__version__) < Version("5.6.0"):
        num_experts = model.num_experts  # upstream: GptOssConfig has no num_experts before 5.6
    return load_balancing_loss_func(backbone_outputs.router_logits, num_experts,
                                    text_config.num_experts_per_tok, attention_mask)


# (module, original add_fused_lm_head) of every replaced binding
_TRL_PATCHED: list[tuple[types.ModuleType, object]] = []


def patch_trl() -> list[str]:
    """Make TRL's trainers (SFT, GRPO, RLOO, KTO, DPO, async GRPO) install :func:`add_fused_lm_head`.

    Replaces ``trl.trainer.utils.add_fused_lm_head`` (trainer modules imported later bind it then) and
    the binding in every loaded ``trl.*`` module. Call it before building the trainer. Supports
    TRL ``>=1.16,<1.17`` (raises on older TRL without the fused head; warns on newer, untested ones).

    Returns:
        The names of the modules patched.

    Example:
        >>> xhf.patch_trl()
        >>> trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds)
    """
    import trl
    from packaging.version import Version

    try:
        import trl.trainer.utils as tu
    except ImportError as e:  # pragma: no cover
        raise RuntimeError(f"patch_trl needs trl {TRL_VERSIONS}: {e}") from e
    v = Version(trl.__version__)
    if v < Version("1.16") or not hasattr(tu, "add_fused_lm_head"):
        raise RuntimeError(f"patch_trl needs trl {TRL_VERSIONS} (with trl.trainer.utils.add_fused_lm_head); "
                           f"found trl {trl.__version__}")
    if v >= Version("1.17"):
        warnings.warn(f"xent's TRL fused head copies the contract of trl 1.16; trl {trl.__version__} is "
                      "untested", stacklevel=2)
    if not _TRL_PATCHED:
        original = tu.add_fused_lm_head
        for name, mod in list(sys.modules.items()):
            if mod is not None and (name == "trl" or name.startswith("trl.")) and \
                    vars(mod).get("add_fused_lm_head") is original:
                _TRL_PATCHED.append((mod, original))
                setattr(mod, "add_fused_lm_head", add_fused_lm_head)
    return [m.__name__ for m, _ in _TRL_PATCHED]


def unpatch_trl() -> None:
    """Undo :func:`patch_trl` (also in trl modules loaded since); no-op when not patched."""
    original = _TRL_PATCHED[0][1] if _TRL_PATCHED else None
    while _TRL_PATCHED:
        mod, fn = _TRL_PATCHED.pop()
        setattr(mod, "add_fused_lm_head", fn)
    if original is not None:
        for name, mod in list(sys.modules.items()):
            if mod is not None and (name == "trl" or name.startswith("trl.")) and \
                    vars(mod).get("add_fused_lm_head") is add_fused_lm_head:
                setattr(mod, "add_fused_lm_head", original)


__all__ = ["FusedCausalLMOutput", "add_fused_lm_head", "patch_trl", "unpatch_trl", "per_token", "one_pass",
           "TRL_VERSIONS"]
