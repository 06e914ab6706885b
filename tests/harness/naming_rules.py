"""The naming rules of issue 17 ("one name per concept") as a checker over signatures, and the list
of the public entry points they apply to. ``tests/package/test_naming.py`` runs it on the public API and on
deliberately misnamed dummies; README.md ("Arguments") states the same rules for users.

Rules, for every parameter of a public function, module constructor or ``forward`` / ``__call__``:
  * class ids are ``target``; logits or hidden states ``input``, a second model's ``teacher_input``;
    a head ``linear_weight`` / ``linear_bias``, a second model's ``teacher_linear_weight`` /
    ``teacher_linear_bias``; per-token weights ``token_weight``: a tensor argument has one of these
    names (or ``weight``), and no parameter has a banned name (``BANNED``: labels, tokens, logits,
    hidden, bias, student_*, ...);
  * ``weight`` is only ever class weights: optional (default None; a head never is) and after
    ``target`` when both are there;
  * these tensors come in one order: input, linear_weight, teacher_input, teacher_linear_weight, target;
  * at most one of ``temperature`` / ``logit_scale``, the family's: the KL family's ``temperature``
    divides the logits, the CE heads' ``logit_scale`` multiplies them (logit_scale = 1 / temperature);
  * a module accepts every parameter of its function with the same defaults (per-call tensors in
    ``forward``, class ``weight`` and the other options in the constructor), and nothing else.
An integration entry point that must keep a framework's call-site names lists them in ``EXEMPT`` with
the reason.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch

import xent_triton
from xent_triton import parallel

TENSOR_NAMES = ("input", "teacher_input", "target", "weight", "linear_weight", "linear_bias",
                "teacher_linear_weight", "teacher_linear_bias", "token_weight")
ORDER = ("input", "linear_weight", "teacher_input", "teacher_linear_weight", "target")
# banned parameter name -> the name the rules give its concept
BANNED = {
    "labels": "target", "label": "target", "tokens": "target", "targets": "target", "y": "target",
    "logits": "input", "hidden": "input", "hidden_states": "input", "pred": "input", "outputs": "input",
    "x": "input", "h": "input", "student_logits": "input", "student_hidden": "input",
    "student_weight": "linear_weight", "student_bias": "linear_bias", "bias": "linear_bias",
    "head_weight": "linear_weight", "lm_head_weight": "linear_weight", "w": "linear_weight",
    "teacher_logits": "teacher_input", "teacher_hidden": "teacher_input",
    "teacher_weight": "teacher_linear_weight", "teacher_bias": "teacher_linear_bias",
    "class_weight": "weight", "token_weights": "token_weight", "scale": "logit_scale",
}
KL_FAMILY = {"distillation_loss", "linear_distillation_loss", "token_logprobs", "linear_token_logprobs",
             "DistillationLoss", "LinearDistillationLoss", "TokenLogprobs", "LinearTokenLogprobs",
             "transformers.add_fused_lm_head"}  # TRL's token log-probs at a temperature
SCALING = {"kl": "temperature", "ce": "logit_scale"}

HF = "transformers' loss_function call site passes it by this keyword"
TITAN = "torchtitan's trainer calls loss_fn(pred, labels, global_valid_tokens, ...)"
EXEMPT = {  # entry point -> {parameter: why it keeps a framework's name}
    "transformers.ForCausalLMLoss": {"logits": HF, "labels": HF, "shift_labels": HF},
    "transformers.fused_causal_lm_loss": {
        "labels": "HF's unshifted labels (shifted inside unless shift_labels), as ForCausalLMLoss's",
        "shift_labels": "HF's name, as ForCausalLMLoss's"},
    "torchtitan.CrossEntropyLoss.__call__": dict.fromkeys(("pred", "labels", "global_valid_tokens"), TITAN),
    "torchtitan.cross_entropy_loss": dict.fromkeys(("pred", "labels", "global_valid_tokens"), TITAN),
    "torchtune.LinearCrossEntropyLoss.forward": {"outputs": "torchtune's SFTLoss.forward(outputs, targets)",
                                                 "targets": "torchtune's SFTLoss.forward(outputs, targets)"},
    "transformers.add_fused_lm_head": {"outputs": "TRL's add_fused_lm_head(..., outputs): field names"},
    "parallel.FusedLMHead.__init__": {"bias": "nn.Linear's constructor flag (a bool, not a tensor)"},
}
# public names that are not called with arguments to name
NOT_CALLS = {"LossStats": "a result type (fields)", "transformers.FusedCausalLMOutput": "TRL's output fields"}

# module -> (its function, arguments the module owns instead of taking them, its own extra arguments)
MODULE_OF = {
    "CrossEntropyLoss": ("cross_entropy", (), ()),
    "LinearCrossEntropyLoss": ("linear_cross_entropy", (), ()),
    "DistillationLoss": ("distillation_loss", (), ()),
    "LinearDistillationLoss": ("linear_distillation_loss", (), ()),
    "TokenLogprobs": ("token_logprobs", (), ()),
    "LinearTokenLogprobs": ("linear_token_logprobs", (), ()),
    # an nn.Linear whose parameters are the head; nn.Linear's constructor arguments
    "parallel.FusedLMHead": ("linear_cross_entropy", ("linear_weight", "linear_bias"),
                             ("in_features", "num_classes", "bias", "device", "dtype")),
}


def params(fn: Callable) -> list[inspect.Parameter]:
    """The named parameters (``self``, ``*args``, ``**kwargs`` left out) of ``fn``'s public signature."""
    return [p for p in inspect.signature(fn).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def takes_any_keyword(fn: Callable) -> bool:
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def is_tensor(p: inspect.Parameter) -> bool:
    """Annotated as a tensor (``Tensor``, ``Optional[Tensor]``; string annotations included)."""
    return "Tensor" in str(p.annotation)


def naming_violations(fn: Callable, family: str, exempt: Optional[dict] = None) -> list[str]:
    """What ``fn``'s signature breaks of the rules (empty when it keeps them all)."""
    exempt = exempt or {}
    ps = [p for p in params(fn) if p.name not in exempt]
    names = [p.name for p in ps]
    bad = []
    for p in ps:
        new = BANNED.get(p.name) or (p.name[len("student_"):] if p.name.startswith("student_") else None)
        if new:
            bad.append(f"{p.name!r} is a banned name: use {new!r}")
        elif is_tensor(p) and p.name not in TENSOR_NAMES:
            bad.append(f"tensor argument {p.name!r} is none of {TENSOR_NAMES}")
    if "weight" in names:
        if ps[names.index("weight")].default is not None:
            bad.append("'weight' is required: class weights are optional (a head is 'linear_weight')")
        if "target" in names and names.index("weight") < names.index("target"):
            bad.append("'weight' comes before 'target': class weights follow the target (a head is "
                       "'linear_weight')")
    scaling = [n for n in ("temperature", "logit_scale") if n in names]
    if len(scaling) > 1:
        bad.append("takes both 'temperature' and 'logit_scale' (one per family: logit_scale = 1 / T)")
    elif scaling and scaling[0] != SCALING[family]:
        bad.append(f"the {family} family scales logits by {SCALING[family]!r}, not {scaling[0]!r}")
    order = [n for n in names if n in ORDER]
    if order != sorted(order, key=ORDER.index):
        bad.append(f"tensor arguments {order} not in the order {[n for n in ORDER if n in order]}")
    return bad


def module_violations(module: type, fn: Callable, owned: tuple = (), extra: tuple = ()) -> list[str]:
    """How ``module`` (constructor + ``forward``) fails to take exactly ``fn``'s parameters, with its
    defaults, per-call tensors in ``forward`` and the rest (class ``weight`` included) in the
    constructor. ``owned``: parameters the module holds itself; ``extra``: its own arguments."""
    want = {p.name: p for p in params(fn)}
    init = {p.name: p for p in params(module.__init__) if p.name not in extra}
    fwd = {p.name: p for p in params(module.forward)}
    open_kw = takes_any_keyword(module.__init__) or takes_any_keyword(module.forward)
    bad = [f"{n!r} is not an argument of {fn.__name__}" for n in [*init, *fwd] if n not in want]
    for n, p in want.items():
        per_call = is_tensor(p) and n != "weight"
        where, other, place = (fwd, init, "forward") if per_call else (init, fwd, "the constructor")
        if n in owned:
            continue
        if n in other or (n not in where and not open_kw):
            bad.append(f"{fn.__name__}'s {n!r} is not an argument of {place}")
        elif n in where and p.default is not p.empty and where[n].default != p.default:
            bad.append(f"{n!r} defaults to {where[n].default!r}, {fn.__name__}'s to {p.default!r}")
    return bad


def integration_modules() -> dict[str, Any]:
    """The integrations' public modules by short name (transformers only when it is installed)."""
    from xent_triton.integrations import torchtitan, torchtune
    mods = {"torchtitan": torchtitan, "torchtune": torchtune}
    try:
        from xent_triton.integrations import transformers
        mods["transformers"] = transformers
    except ImportError:  # the [hf] extra is not installed
        pass
    return mods


def calls_of(name: str, obj: Any) -> list[tuple[str, Callable]]:
    """``(qualified name, callable)``: a function itself; a class's constructor and its ``forward``
    (a module) or ``__call__``."""
    if not inspect.isclass(obj):
        return [(name, obj)]
    method = "forward" if issubclass(obj, torch.nn.Module) else "__call__"
    return [(f"{name}.__init__", obj.__init__), (f"{name}.{method}", getattr(obj, method))]


def public_entry_points() -> list[tuple[str, Callable, str]]:
    """``(name, callable, family)`` for every public function and module method: ``xent_triton.__all__``,
    ``xent_triton.parallel.__all__`` and the integrations' ``__all__`` (constants left out)."""
    named = [(n, getattr(xent_triton, n)) for n in xent_triton.__all__]
    named += [(f"parallel.{n}", getattr(parallel, n)) for n in parallel.__all__]
    for short, mod in integration_modules().items():
        named += [(f"{short}.{n}", getattr(mod, n)) for n in mod.__all__ if callable(getattr(mod, n))]
    out = []
    for name, obj in named:
        if name in NOT_CALLS:
            continue
        family = "kl" if name in KL_FAMILY else "ce"
        out += [(qual, fn, family) for qual, fn in calls_of(name, obj)]
    return out


def module_pairs() -> list[tuple[str, type, Callable, tuple, tuple]]:
    """``(module name, module, function, owned, extra)`` for every public module."""
    def get(name: str) -> Any:
        if name.startswith("parallel."):
            return getattr(parallel, name[len("parallel."):])
        return getattr(xent_triton, name)
    return [(m, get(m), getattr(xent_triton, f), owned, extra) for m, (f, owned, extra) in MODULE_OF.items()]
