"""The KL family's renamed arguments (issue 17): every old keyword of every function and module
``forward`` still works, with a DeprecationWarning naming the new one, and gives the same result as
the new name; the old and the new one together raise TypeError (table: function x old name)."""
from __future__ import annotations

import warnings

import pytest
import torch

import xent_triton
from xent_triton.kl.names import LINEAR_DISTILL, LINEAR_LOGPROBS, LOGITS, LOGPROBS

N, C, D, DT = 3, 7, 4, 5


def _tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, C, (N,), generator=g)
    return dict(
        logits=dict(input=torch.randn(N, C, generator=g), teacher_input=torch.randn(N, C, generator=g),
                    target=ids),
        linear=dict(input=torch.randn(N, D, generator=g), linear_weight=torch.randn(C, D, generator=g),
                    teacher_input=torch.randn(N, DT, generator=g),
                    teacher_linear_weight=torch.randn(C, DT, generator=g), target=ids,
                    linear_bias=torch.randn(C, generator=g), teacher_linear_bias=torch.randn(C, generator=g)),
    )


# (name, callable taking keywords, the renames, which tensors, the new names it takes)
TABLE = [
    ("distillation_loss", xent_triton.distillation_loss, LOGITS, "logits"),
    ("token_logprobs", xent_triton.token_logprobs, LOGPROBS, "logits"),
    ("linear_distillation_loss", xent_triton.linear_distillation_loss, LINEAR_DISTILL, "linear"),
    ("linear_token_logprobs", xent_triton.linear_token_logprobs, LINEAR_LOGPROBS, "linear"),
    ("DistillationLoss.forward", xent_triton.DistillationLoss(), LOGITS, "logits"),
    ("TokenLogprobs.forward", xent_triton.TokenLogprobs(), LOGPROBS, "logits"),
    ("LinearDistillationLoss.forward", xent_triton.LinearDistillationLoss(), LINEAR_DISTILL, "linear"),
    ("LinearTokenLogprobs.forward", xent_triton.LinearTokenLogprobs(), LINEAR_LOGPROBS, "linear"),
]
CASES = [pytest.param(fn, renames, kind, old, id=f"{name}-{old}")
         for name, fn, renames, kind in TABLE for old in renames]


def _new_kwargs(renames: dict, kind: str) -> dict:
    avail = _tensors()[kind]
    return {new: avail[new] for new in set(renames.values())}


@pytest.mark.parametrize("fn, renames, kind, old", CASES)
def test_old_keyword_warns_and_works(fn, renames, kind, old):
    kw = _new_kwargs(renames, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        expected = fn(**kw)
    new = renames[old]
    kw_old = dict(kw)
    kw_old[old] = kw_old.pop(new)
    with pytest.warns(DeprecationWarning, match=f"'{old}' is deprecated, use '{new}'"):
        got = fn(**kw_old)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("fn, renames, kind, old", CASES)
def test_old_and_new_together_raise(fn, renames, kind, old):
    kw = _new_kwargs(renames, kind)
    kw[old] = kw[renames[old]]
    with pytest.raises(TypeError, match=f"both '{renames[old]}' and its deprecated name '{old}'"):
        fn(**kw)


def test_new_by_position_and_old_by_keyword_raise():
    t = _tensors()["logits"]
    with pytest.raises(TypeError, match="both 'target' and its deprecated name 'labels'"):
        xent_triton.distillation_loss(t["input"], t["teacher_input"], t["target"], labels=t["target"])
