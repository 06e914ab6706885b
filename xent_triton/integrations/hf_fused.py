"""Fused LM head on one transformers model instance: ``apply`` / ``revert``.

How it works: the model's own forward still runs (so everything it does around the head, MoE
auxiliary loss included, stays), with two instance-level hooks in force while a fused call is on:

* the output embedding's ``forward`` records the hidden states it is given (already sliced by
  ``logits_to_keep``) and returns an empty ``(..., 0)`` placeholder instead of the logits, which the
  model's own post-head ops (softcap, scaling) run on at no cost;
* the model's ``loss_function`` computes the loss with ``xent_triton.linear_cross_entropy`` on the
  recorded hidden states, with the logit transform that the forward applies between ``lm_head`` and
  ``loss_function``, recognised from its source (Gemma's ``final_logit_softcapping``, Granite's
  ``/ logits_scaling``, Cohere's ``* logit_scale``, or none).

Outside fused calls the head is the stock one and the loss is the logits path (``_loss``).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from typing import Any, Optional

from torch import Tensor

import xent_triton

from ..core.renames import renamed_keywords
from .hf_common import NumItems, divide_by_items, head_operands, next_token_targets
from .hf_loss import causal_lm_loss

# Architectures whose loss and every parameter gradient are tested equal to the stock model's.
TESTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
    "Gemma3ForCausalLM", "GraniteForCausalLM", "CohereForCausalLM", "Phi3ForCausalLM", "Olmo2ForCausalLM",
    "MixtralForCausalLM", "Qwen2MoeForCausalLM",
)

# What a forward may do to the logits between ``lm_head`` and ``loss_function`` (source lines, stripped,
# comments dropped) -> (softcap, logit_scale) of a model instance.
_TRANSFORMS = {
    (): lambda m: (None, 1.0),
    ("if self.config.final_logit_softcapping is not None:",
     "logits = logits / self.config.final_logit_softcapping",
     "logits = torch.tanh(logits)",
     "logits = logits * self.config.final_logit_softcapping"):
        lambda m: (m.config.final_logit_softcapping, 1.0),
    ("logits = logits / self.config.logits_scaling",): lambda m: (None, 1.0 / m.config.logits_scaling),
    ("logits = logits * self.logit_scale",): lambda m: (None, float(m.logit_scale)),
}
_NEUTRAL = ("loss = None", "if labels is not None:")


@functools.lru_cache(maxsize=None)
def head_transform(cls: type):
    """The ``model -> (softcap, logit_scale)`` function of a causal-LM class, read from its forward.

    Raises NotImplementedError when the forward is not the standard causal-LM shape
    (``logits = self.lm_head(hidden_states)``, an optional recognised transform, ``self.loss_function(...)``).
    """
    try:
        lines = inspect.getsource(inspect.unwrap(cls.forward)).splitlines()
    except (OSError, TypeError) as e:
        raise _unsupported(cls, f"its forward's source is not available ({e})") from None
    body = [ln.split("#")[0].strip() for ln in lines]
    head = [i for i, ln in enumerate(body) if ln == "logits = self.lm_head(hidden_states)"]
    loss = [i for i, ln in enumerate(body) if "self.loss_function(" in ln]
    if len(head) != 1 or len(loss) != 1 or loss[0] < head[0]:
        raise _unsupported(cls, "its forward does not compute `logits = self.lm_head(hidden_states)` and "
                                "then `self.loss_function(...)` once each")
    between = tuple(ln for ln in body[head[0] + 1:loss[0]] if ln and ln not in _NEUTRAL)
    if between not in _TRANSFORMS:
        raise _unsupported(cls, f"it transforms the logits in a way xent does not recognise: {list(between)}")
    return _TRANSFORMS[between]


def _unsupported(cls: type, why: str) -> NotImplementedError:
    return NotImplementedError(
        f"xent_triton.integrations.transformers.apply: {cls.__name__} is not supported: {why}. Tested: "
        f"{', '.join(TESTED_ARCHITECTURES)}; any other model whose forward has the standard causal-LM shape "
        "(lm_head, then optionally final_logit_softcapping / logits_scaling / logit_scale, then "
        "self.loss_function) is served too. Use xhf.patch_loss_functions() (the logits path) instead.")


@dataclasses.dataclass
class _Call:
    skip: bool
    want_stats: bool
    head: Any = None
    hidden: Optional[Tensor] = None
    stats: Any = None


class _State:
    """What ``apply`` changed on a model (to revert it) and the fused calls in flight. Holds nothing
    that cannot be pickled (no lambda, closure or bound method): ``torch.save(model)`` and
    multiprocessing hand-offs of an applied model work."""

    def __init__(self, model, head, skip_default: Optional[bool]):
        self.head = head
        self.skip_default = skip_default
        head_transform(type(model))  # raises NotImplementedError now for an unsupported forward
        self.saved_forward = model.__dict__.get("forward")
        self.saved_head_forward = head.__dict__.get("forward")
        self.saved_loss_function = model.__dict__.get("_loss_function")
        self.calls: list[_Call] = []
        self.metrics: Any = None  # hf_trainer.IntervalStats while fused_trainer logs the stats

    def current(self) -> Optional[_Call]:
        return self.calls[-1] if self.calls else None


@functools.lru_cache(maxsize=None)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


@functools.lru_cache(maxsize=None)
def _takes_return_dict(cls: type) -> bool:
    # can_return_tuple (every transformers 5 causal LM) takes return_dict: ask for a ModelOutput, whose
    # logits field can be set to None by name, and convert it to a tuple afterwards when the caller wants one
    return "return_dict" in _signature(cls).parameters or _decorated_with(cls.forward, "can_return_tuple")


class _Bound:
    """``fn(owner, *args, **kwargs)`` for a module-level ``fn``: an instance attribute that pickles and
    deep-copies with its owner (a ``types.MethodType`` of a module function fails to unpickle, a closure
    to pickle)."""

    def __init__(self, fn_name: str, owner: Any, stock: Optional[str] = None):
        self.fn_name, self.owner, self.stock = fn_name, owner, stock

    def __call__(self, *args: Any, **kwargs: Any):
        return globals()[self.fn_name](self.owner, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        # what inspect.signature(model.forward) reports (the Trainer's unused-column removal and generate()
        # read it): the stock bound method's
        if self.stock is not None:
            return inspect.signature(types.MethodType(getattr(type(self.owner), self.stock), self.owner))
        return inspect.signature(functools.partial(globals()[self.fn_name], self.owner))


@renamed_keywords(hidden="input", weight="linear_weight", bias="linear_bias")
def fused_causal_lm_loss(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor],
                         labels: Tensor, *,
                         num_items_in_batch: NumItems = None, ignore_index: int = -100,
                         shift_labels: Optional[Tensor] = None, softcap: Optional[float] = None,
                         logit_scale: float = 1.0, return_stats: bool = False):
    """``ForCausalLMLoss`` of the logits ``input @ linear_weight.T + linear_bias``, never materialised.

    ``input``: the final hidden states (B, T, D) or (N, D) (what the head would get, after
    ``logits_to_keep``); ``labels`` as in ``ForCausalLMLoss`` (shifted inside unless ``shift_labels``).
    Returns the loss, or ``(loss, stats)``. The old keywords ``hidden=`` / ``weight=`` / ``bias=``
    still work, with a DeprecationWarning.
    """
    targets = next_token_targets(labels, shift_labels, ignore_index)
    h = input.reshape(-1, input.shape[-1])
    y = targets.reshape(-1).to(h.device)
    if h.shape[0] != y.shape[0]:
        raise ValueError(
            f"the LM head got {h.shape[0]} positions (after logits_to_keep) but the labels give {y.shape[0]} "
            "targets: with logits_to_keep, pass shift_labels aligned with the kept positions, or train with "
            "logits_to_keep=0 (the stock model fails here too)")
    h, w, b, ctx = head_operands(h, linear_weight, linear_bias)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    stats_kw = {"return_stats": True} if return_stats else {}
    with ctx:
        out = xent_triton.linear_cross_entropy(
            h, w, y, linear_bias=b, ignore_index=ignore_index, reduction=reduction, softcap=softcap,
            logit_scale=logit_scale, empty_batch="zero", **stats_kw)
    loss, stats = out if return_stats else (out, None)
    if num_items_in_batch is not None:
        loss = divide_by_items(loss, num_items_in_batch)
    return (loss, stats) if return_stats else loss


def apply(model, *, skip_logits: Optional[bool] = None):
    """Make ``model``'s causal-LM forward compute its loss with ``xent_triton.linear_cross_entropy``.

    Patches this instance only (returns it). A call with ``labels`` then never materialises the
    (B, T, V) logits when ``skip_logits`` holds (``None``: ``model.training and labels is not None``,
    so evaluation with ``compute_metrics`` still gets logits); its output's ``logits`` is ``None``. Any
    call may pass ``skip_logits=True/False`` and ``return_token_accuracy=True`` (sets the output's
    ``token_accuracy``, n_correct / n_valid of this batch, and ``loss_stats``, the raw
    ``xent_triton.LossStats`` sums to all-reduce). Everything else is the stock forward's: ``labels``
    shifted inside, ``shift_labels``, ``num_items_in_batch`` (loss = sum / it), ``logits_to_keep``,
    attention masks, tied embeddings, an lm_head bias, Gemma's final softcap, Granite's and Cohere's
    logit scaling, the MoE auxiliary loss. A batch whose targets are all ignored gives a loss of 0 with
    zero gradients (not NaN). Calls without a fused loss use ``ForCausalLMLoss`` of this package.

    Args:
        model: a transformers causal LM (see ``TESTED_ARCHITECTURES``; other models whose forward has
            the standard shape work too, others raise NotImplementedError). Apply it before wrapping
            the model with PEFT (LoRA on the lm_head is not supported).
        skip_logits: the default for calls that do not pass it.

    Example:
        >>> model = xhf.apply(AutoModelForCausalLM.from_config(config)).train()
        >>> out = model(input_ids, attention_mask=mask, labels=labels)
        >>> out.loss.backward(); assert out.logits is None
    """
    if getattr(model, "_xent_fused", None) is not None:
        model._xent_fused.skip_default = skip_logits
        return model
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise NotImplementedError(f"{type(model).__name__} has no output embedding with a weight (lm_head)")
    state = _State(model, head, skip_logits)
    # Everything is bound to the modules and finds its state through them (no closure over this model):
    # a deepcopy or an unpickled copy of the patched model gets its own state, head and hooks.
    head._xent_fused = state
    head.forward = _Bound("_head_forward", head, "forward")
    model.loss_function = _Bound("_loss_function", model)
    model.forward = _Bound("_forward", model, "forward")
    model._xent_fused = state
    return model


def _head_forward(self, hidden_states: Tensor, *a: Any, **k: Any) -> Tensor:
    state = self._xent_fused
    call = state.current()
    if call is None or not call.skip or a or k:
        if state.saved_head_forward is not None:
            return state.saved_head_forward(hidden_states, *a, **k)
        return type(self).forward(self, hidden_states, *a, **k)
    call.head, call.hidden = self, hidden_states
    return hidden_states.new_empty(hidden_states.shape[:-1] + (0,))


def _loss_function(self, logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch: NumItems = None,
                   ignore_index: int = -100, shift_labels: Optional[Tensor] = None, **kwargs: Any):
    state = self._xent_fused
    call = state.current()
    want = call is not None and (call.want_stats or state.metrics is not None)
    if call is not None and call.hidden is not None:
        softcap, scale = head_transform(type(self))(self)
        out = fused_causal_lm_loss(
            call.hidden, call.head.weight, getattr(call.head, "bias", None), labels,
            num_items_in_batch=num_items_in_batch, ignore_index=ignore_index, shift_labels=shift_labels,
            softcap=softcap, logit_scale=scale, return_stats=want)
    else:
        out = causal_lm_loss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels,
                             return_stats=want)
    if want:
        out, stats = out
        if state.metrics is not None:
            state.metrics.add(stats, self.training)
        if call.want_stats:
            call.stats = stats
    return out


def _forward(self, *args: Any, skip_logits: Optional[bool] = None, return_token_accuracy: bool = False,
             **kwargs: Any):
    state = self._xent_fused
    labels = _signature(type(self)).bind_partial(self, *args, **kwargs).arguments.get("labels")
    skip = state.skip_default if skip_logits is None else skip_logits
    skip = (self.training and labels is not None) if skip is None else bool(skip)
    if (skip or return_token_accuracy) and labels is None:
        raise ValueError("skip_logits=True and return_token_accuracy=True need labels")
    call = _Call(skip=skip, want_stats=return_token_accuracy)
    passed = kwargs.pop("return_dict", None)
    return_dict = passed if passed is not None else getattr(self.config, "return_dict", True)
    if _takes_return_dict(type(self)):
        kwargs["return_dict"] = True
    elif passed is not None:
        kwargs["return_dict"] = passed
    state.calls.append(call)
    try:
        if state.saved_forward is not None:
            out = state.saved_forward(*args, **kwargs)
        else:
            out = type(self).forward(self, *args, **kwargs)
    finally:
        state.calls.pop()
    out = _finish(out, call)
    return _to_tuple(out, call) if not return_dict and not isinstance(out, tuple) else out


def _decorated_with(fn, name: str) -> bool:
    while fn is not None:
        if name in getattr(fn, "__qualname__", ""):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def _finish(out, call: _Call):
    """Drop the placeholder logits of a fused call, attach the token accuracy when asked."""
    if isinstance(out, tuple):  # a forward without return_dict: the placeholder is the (..., 0) tensor
        if call.hidden is not None:
            out = tuple(None if isinstance(t, Tensor) and t.dim() > 1 and t.shape[-1] == 0 else t
                        for t in out)
        if call.stats is not None:
            out = out + (_accuracy(call.stats),)
        return out
    if call.hidden is not None:
        values = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        values["logits"] = None
        out = type(out)(**values)
    if call.stats is not None:
        out["token_accuracy"] = _accuracy(call.stats)
        out["loss_stats"] = call.stats
    return out


def _to_tuple(out, call: _Call) -> tuple:
    """``out.to_tuple()`` (the fields that are not None, in order), but with ``None`` kept in the logits
    slot of a fused call: the stock tuple layout (loss, logits, past_key_values, ...) stays, so
    ``out[1]`` is never the cache."""
    names = [f.name for f in dataclasses.fields(out)]
    keep = [v for k, v in ((k, getattr(out, k)) for k in names)
            if v is not None or (k == "logits" and call.hidden is not None)]
    return tuple(keep) + tuple(v for k, v in out.items() if k not in names)


def _accuracy(stats) -> Tensor:
    return stats.n_correct.float() / stats.n_valid.clamp(min=1).float()


def revert(model):
    """Undo :func:`apply` on ``model`` (returns it; no-op when not applied).

    Example:
        >>> xhf.revert(model)
    """
    state = getattr(model, "_xent_fused", None)
    if state is None:
        return model
    for obj, name, saved in ((model, "forward", state.saved_forward),
                             (state.head, "forward", state.saved_head_forward)):
        if saved is None:
            obj.__dict__.pop(name, None)
        else:
            obj.__dict__[name] = saved
    if state.saved_loss_function is None:
        model.__dict__.pop("_loss_function", None)
    else:
        model._loss_function = state.saved_loss_function
    del model._xent_fused
    state.head.__dict__.pop("_xent_fused", None)
    return model


def is_applied(model) -> bool:
    """Whether :func:`apply` is in force on ``model``."""
    return getattr(model, "_xent_fused", None) is not None


__all__ = ["TESTED_ARCHITECTURES", "apply", "revert", "is_applied", "fused_causal_lm_loss", "head_transform"]
