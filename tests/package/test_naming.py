"""One name per concept (issue 17): the rules of ``naming_rules.py`` hold for every public function,
module and integration entry point; the checker reports misnamed dummies (so it can fail); README's
argument and rename tables match the code; renamed keywords still work with a DeprecationWarning."""
from __future__ import annotations

import inspect
import pathlib
import re
import warnings
from typing import Any, Optional

import pytest
import torch
from torch import Tensor, nn

import xent_triton
from naming_rules import (
    EXEMPT,
    MODULE_OF,
    integration_modules,
    module_pairs,
    module_violations,
    naming_violations,
    params,
    public_entry_points,
)
from xent_triton import parallel
from xent_triton.core.renames import renamed_keywords

README = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
ENTRY_POINTS = public_entry_points()


@pytest.mark.parametrize("name,fn,family", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_entry_point_keeps_the_naming_rules(name, fn, family):
    assert naming_violations(fn, family, EXEMPT.get(name)) == []


PAIRS = module_pairs()


@pytest.mark.parametrize("name,module,fn,owned,extra", PAIRS, ids=[p[0] for p in PAIRS])
def test_module_takes_every_argument_of_its_function(name, module, fn, owned, extra):
    assert module_violations(module, fn, owned, extra) == []


def test_every_public_module_is_checked():
    modules = {n for n in xent_triton.__all__ if isinstance(getattr(xent_triton, n), type)
               and issubclass(getattr(xent_triton, n), nn.Module)}
    modules |= {f"parallel.{n}" for n in parallel.__all__}
    assert modules == set(MODULE_OF)


def test_every_exemption_is_needed():
    """An exemption names a parameter that exists and that the rules would otherwise report."""
    found = {name: (fn, family) for name, fn, family in ENTRY_POINTS}
    for name, exempt in EXEMPT.items():
        if name.startswith("transformers.") and name not in found:
            continue  # the [hf] extra is not installed
        fn, family = found[name]
        for param in exempt:
            assert param in [p.name for p in params(fn)], (name, param)
            rest = {k: v for k, v in exempt.items() if k != param}
            assert any(repr(param) in v for v in naming_violations(fn, family, rest)), (name, param)


# ---- the checker itself reports what it must (each dummy breaks one rule)

def logits_and_labels(logits: Tensor, labels: Tensor) -> Tensor: ...
def student_prefix(input: Tensor, student_weight: Tensor, target: Tensor) -> Tensor: ...
def head_named_weight(input: Tensor, weight: Tensor, target: Tensor) -> Tensor: ...
def weight_before_target(input: Tensor, weight: Optional[Tensor] = None,
                         target: Optional[Tensor] = None) -> Tensor: ...
def bias_not_linear_bias(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         bias: Optional[Tensor] = None) -> Tensor: ...
def unknown_tensor(input: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Tensor: ...
def both_scalings(input: Tensor, target: Tensor, *, temperature: float = 1.0,
                  logit_scale: float = 1.0) -> Tensor: ...
def wrong_family_scaling(input: Tensor, target: Tensor, *, temperature: float = 1.0) -> Tensor: ...
def out_of_order(input: Tensor, target: Tensor, linear_weight: Tensor) -> Tensor: ...
def well_named(input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Optional[Tensor] = None,
               weight: Optional[Tensor] = None, token_weight: Optional[Tensor] = None,
               logit_scale: float = 1.0) -> Tensor: ...


DUMMIES = [  # (dummy, family, what the checker must say)
    (logits_and_labels, "ce", ["'logits' is a banned name: use 'input'",
                               "'labels' is a banned name: use 'target'"]),
    (student_prefix, "kl", ["'student_weight' is a banned name: use 'linear_weight'"]),
    (head_named_weight, "ce", ["'weight' is required", "'weight' comes before 'target'"]),
    (weight_before_target, "ce", ["'weight' comes before 'target'"]),
    (bias_not_linear_bias, "ce", ["'bias' is a banned name: use 'linear_bias'"]),
    (unknown_tensor, "ce", ["tensor argument 'mask' is none of"]),
    (both_scalings, "ce", ["takes both 'temperature' and 'logit_scale'"]),
    (wrong_family_scaling, "ce", ["the ce family scales logits by 'logit_scale', not 'temperature'"]),
    (out_of_order, "ce", ["not in the order ['input', 'linear_weight', 'target']"]),
    (well_named, "ce", []),
]


@pytest.mark.parametrize("fn,family,expected", DUMMIES, ids=[d[0].__name__ for d in DUMMIES])
def test_checker_reports_a_misnamed_function(fn, family, expected):
    found = naming_violations(fn, family)
    assert len(found) == len(expected), found
    for message, fragment in zip(found, expected):
        assert fragment in message, (message, fragment)


def dummy_loss(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, *, reduction: str = "mean",
               token_weight: Optional[Tensor] = None) -> Tensor: ...


class MissingOption(nn.Module):
    def __init__(self, weight: Optional[Tensor] = None) -> None: ...
    def forward(self, input: Tensor, target: Tensor, token_weight: Optional[Tensor] = None) -> Tensor: ...


class TensorInConstructor(nn.Module):
    def __init__(self, weight: Optional[Tensor] = None, reduction: str = "mean",
                 token_weight: Optional[Tensor] = None) -> None: ...
    def forward(self, input: Tensor, target: Tensor) -> Tensor: ...


class OtherDefault(nn.Module):
    def __init__(self, weight: Optional[Tensor] = None, reduction: str = "sum") -> None: ...
    def forward(self, input: Tensor, target: Tensor, token_weight: Optional[Tensor] = None) -> Tensor: ...


class ExtraArgument(nn.Module):
    def __init__(self, weight: Optional[Tensor] = None, reduction: str = "mean",
                 scale: float = 1.0) -> None: ...
    def forward(self, input: Tensor, target: Tensor, token_weight: Optional[Tensor] = None) -> Tensor: ...


class Complete(nn.Module):
    def __init__(self, weight: Optional[Tensor] = None, reduction: str = "mean") -> None: ...
    def forward(self, input: Tensor, target: Tensor, token_weight: Optional[Tensor] = None) -> Tensor: ...


MODULE_DUMMIES = [
    (MissingOption, "'reduction' is not an argument of the constructor"),
    (TensorInConstructor, "'token_weight' is not an argument of forward"),
    (OtherDefault, "'reduction' defaults to 'sum', dummy_loss's to 'mean'"),
    (ExtraArgument, "'scale' is not an argument of dummy_loss"),
    (Complete, None),
]


@pytest.mark.parametrize("module,expected", MODULE_DUMMIES, ids=[m[0].__name__ for m in MODULE_DUMMIES])
def test_checker_reports_a_module_missing_an_option(module, expected):
    found = module_violations(module, dummy_loss)
    assert len(found) == (expected is not None), found
    assert expected is None or expected in found[0], (found, expected)


# ---- README's tables

def table_rows(heading: str) -> list[list[list[str]]]:
    """The rows under ``heading`` of README as cells of backticked names (up to the next heading)."""
    section = README.split(heading, 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [[re.findall(r"`([\w.]+)`", cell) for cell in row.strip().strip("|").split("|")] for row in rows]


def resolve(name: str) -> Any:
    if "." not in name:
        return getattr(xent_triton, name)
    mods = {"parallel": parallel, **integration_modules()}
    short, attr = name.split(".", 1)
    if short not in mods:
        pytest.skip(f"{short} not installed")
    return getattr(mods[short], attr)


API_ROWS = table_rows("### Arguments: one name per concept")


def named_params(obj: Any) -> set[str]:
    if inspect.isclass(obj):
        call = obj.forward if issubclass(obj, nn.Module) else obj.__call__
        return {p.name for p in params(obj.__init__)} | {p.name for p in params(call)}
    return {p.name for p in params(obj)}


@pytest.mark.parametrize("row", API_ROWS, ids=[" ".join(r[0]) for r in API_ROWS])
def test_readme_api_table_lists_the_arguments(row):
    names, tensors, options = row
    listed = {n for n in tensors + options if "." not in n}  # `nn.Linear`: a reference in the text
    documented = set()
    for name in names:
        obj = resolve(name)
        documented |= named_params(obj)
        if inspect.isclass(obj) and issubclass(obj, nn.Module) and name in MODULE_OF:
            assert {p.name for p in params(obj.forward)} <= set(tensors), name
    assert documented == listed, (f"README lists {sorted(listed - documented)} that the code lacks; the code "
                                  f"has {sorted(documented - listed)} that README lacks")


def test_readme_api_table_covers_every_entry_point():
    rows = {n for row in API_ROWS for n in row[0]}
    for name, _, _ in ENTRY_POINTS:
        root = name.rsplit(".", 1)[0] if name.endswith((".__init__", ".forward", ".__call__")) else name
        assert root in rows, f"{root} is not in README's API table"


RENAMES = [(name, old, new) for names, pairs in table_rows("### Renamed arguments")
           for name in names for old, new in zip(pairs[::2], pairs[1::2])]


def operands(names: list[str], linear: bool) -> dict[str, Tensor]:
    """Small float64 operands by argument name (the torch path: fast, exact); ``linear``: ``input``
    is hidden states (D = 5) before a (7, 5) head, else logits (C = 7)."""
    g = torch.Generator().manual_seed(0)
    C, D, Dt = 7, 5, 6
    make = {"input": (2, 3, D if linear else C), "teacher_input": (2, 3, Dt if linear else C),
            "linear_weight": (C, D), "teacher_linear_weight": (C, Dt), "linear_bias": (C,),
            "teacher_linear_bias": (C,)}
    out = {n: torch.randn(make[n], generator=g, dtype=torch.float64) for n in names if n in make}
    for n in ("target", "labels"):
        if n in names:
            out[n] = torch.randint(0, C, (2, 3), generator=g)
    return out


def instance(name: str, obj: Any) -> Any:
    if name == "parallel.FusedLMHead":
        return obj(5, 7, bias=True, dtype=torch.float64)
    return obj() if inspect.isclass(obj) else obj


@pytest.mark.parametrize("name,old,new", RENAMES, ids=[f"{n}:{o}" for n, o, _ in RENAMES])
def test_renamed_keyword_warns_and_still_works(name, old, new):
    call = instance(name, resolve(name))
    ps = params(call.forward if isinstance(call, nn.Module) else call)
    assert new in [p.name for p in ps], f"{name} has no argument {new!r}"
    assert old not in [p.name for p in ps], f"{name} still has an argument {old!r}"
    args = operands([p.name for p in ps if p.default is inspect.Parameter.empty or p.name == new],
                    linear=isinstance(call, parallel.FusedLMHead) or "linear_weight" in [p.name for p in ps])
    expected = call(**args)
    renamed = {(old if k == new else k): v for k, v in args.items()}
    with pytest.warns(DeprecationWarning, match=new):  # the contract: the warning names the new keyword
        got = call(**renamed)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(TypeError):  # old and new together
        call(**args, **{old: args[new]})


# ---- the deprecation helper

@renamed_keywords(hidden="input", labels="target")
def renamed(input: Tensor, target: Optional[Tensor] = None, scale: float = 1.0) -> tuple:
    return input, target, scale


def test_renamed_keywords_helper():
    assert list(inspect.signature(renamed).parameters) == ["input", "target", "scale"]
    with pytest.warns(DeprecationWarning, match="'labels' is deprecated, use 'target'"):
        assert renamed(1, labels=2) == (1, 2, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert renamed(1, 2, scale=3.0) == renamed(input=1, target=2, scale=3.0) == (1, 2, 3.0)
    with pytest.raises(TypeError, match="got both 'input' and its deprecated name 'hidden'"):
        renamed(1, hidden=1)  # the new name by position
    with pytest.raises(TypeError, match="got both 'target' and its deprecated name 'labels'"):
        renamed(1, target=2, labels=2)
    with pytest.raises(ValueError, match="has no parameter"):
        renamed_keywords(x="nothing")(renamed.__wrapped__)
