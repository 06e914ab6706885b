"""Release metadata users depend on (issue 23). The package ships ``py.typed``, so the annotations of
the public callables are what users' type checkers read: each one must be complete. The version string
must have its CHANGELOG entry. The built wheel itself (contents, install, import, one loss) is checked
by ``.ci/package_check.sh``; the type check of the public modules by ``mypy`` (pyproject.toml), with
the calls of ``typing_usage.py``."""
import inspect
import pathlib
import re
import typing

import pytest

import xent_triton
from xent_triton.parallel import FusedLMHead

ROOT = pathlib.Path(__file__).resolve().parents[2]

# (name, callable): every public function, and the constructor and forward of every public module.
PUBLIC_CALLABLES = [
    ("cross_entropy", xent_triton.cross_entropy),
    ("linear_cross_entropy", xent_triton.linear_cross_entropy),
    ("distillation_loss", xent_triton.distillation_loss),
    ("linear_distillation_loss", xent_triton.linear_distillation_loss),
    ("token_logprobs", xent_triton.token_logprobs),
    ("linear_token_logprobs", xent_triton.linear_token_logprobs),
    ("CrossEntropyLoss.__init__", xent_triton.CrossEntropyLoss.__init__),
    ("CrossEntropyLoss.forward", xent_triton.CrossEntropyLoss.forward),
    ("LinearCrossEntropyLoss.__init__", xent_triton.LinearCrossEntropyLoss.__init__),
    ("LinearCrossEntropyLoss.forward", xent_triton.LinearCrossEntropyLoss.forward),
    ("DistillationLoss.__init__", xent_triton.DistillationLoss.__init__),
    ("DistillationLoss.forward", xent_triton.DistillationLoss.forward),
    ("LinearDistillationLoss.__init__", xent_triton.LinearDistillationLoss.__init__),
    ("LinearDistillationLoss.forward", xent_triton.LinearDistillationLoss.forward),
    ("TokenLogprobs.__init__", xent_triton.TokenLogprobs.__init__),
    ("TokenLogprobs.forward", xent_triton.TokenLogprobs.forward),
    ("LinearTokenLogprobs.__init__", xent_triton.LinearTokenLogprobs.__init__),
    ("LinearTokenLogprobs.forward", xent_triton.LinearTokenLogprobs.forward),
    ("parallel.FusedLMHead.__init__", FusedLMHead.__init__),
    ("parallel.FusedLMHead.forward", FusedLMHead.forward),
]


def missing_annotations(fn) -> list[str]:
    sig = inspect.signature(fn)
    missing = [p.name for p in sig.parameters.values()
               if p.name != "self" and p.annotation is inspect.Parameter.empty]
    if sig.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


def test_public_callables_table_covers_all():
    names = {name.split(".")[0] for name, _ in PUBLIC_CALLABLES}
    assert set(xent_triton.__all__) - {"LossStats"} <= names  # LossStats: a NamedTuple of typed fields


@pytest.mark.parametrize("name,fn", PUBLIC_CALLABLES, ids=[n for n, _ in PUBLIC_CALLABLES])
def test_public_callable_fully_annotated(name, fn):
    assert missing_annotations(fn) == [], f"{name}: unannotated {missing_annotations(fn)}"


# Functions whose return depends on a flag: typed by two @overloads (the loss alone / the tuple), which
# must list the implementation's parameters (an added parameter missing there is a user's type error).
OVERLOADED = [xent_triton.cross_entropy, xent_triton.linear_cross_entropy, xent_triton.token_logprobs,
              xent_triton.linear_token_logprobs]


@pytest.mark.skipif(not hasattr(typing, "get_overloads"), reason="typing.get_overloads: Python >= 3.11")
@pytest.mark.parametrize("fn", OVERLOADED, ids=[f.__name__ for f in OVERLOADED])
def test_overloads_list_the_implementations_parameters(fn):
    overloads = typing.get_overloads(fn)
    assert len(overloads) == 2
    want = [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]
    for o in overloads:
        assert [(p.name, p.kind) for p in inspect.signature(o).parameters.values()] == want


def test_version_has_changelog_entry():
    version = xent_triton.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## [{version}]" in changelog, f"CHANGELOG.md has no '## [{version}]' section"
