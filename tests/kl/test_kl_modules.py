"""The KL family's modules (``DistillationLoss``, ``LinearDistillationLoss``, ``TokenLogprobs``,
``LinearTokenLogprobs``) equal their functions, for every option: every keyword option of each
function is a constructor keyword or a ``forward`` argument of its module (a new option breaks
this test until the module takes it), and a table of option settings gives bitwise the same
values and gradients through the module and the function (torch path: the module adds no math)."""

from __future__ import annotations

import inspect

import pytest
import torch

import xent_triton
from xent_triton import (
    DistillationLoss,
    LinearDistillationLoss,
    LinearTokenLogprobs,
    TokenLogprobs,
    distillation_loss,
    linear_distillation_loss,
    linear_token_logprobs,
    token_logprobs,
)

PAIRS = [
    (DistillationLoss, distillation_loss),
    (LinearDistillationLoss, linear_distillation_loss),
    (TokenLogprobs, token_logprobs),
    (LinearTokenLogprobs, linear_token_logprobs),
]


@pytest.mark.parametrize("module, fn", PAIRS, ids=lambda v: getattr(v, "__name__", ""))
def test_module_takes_every_option(module, fn):
    """Every parameter of the function is a module constructor keyword or a forward argument,
    with the function's default."""
    fsig = inspect.signature(fn).parameters
    init = inspect.signature(module.__init__).parameters
    fwd = inspect.signature(module.forward).parameters
    missing = [n for n in fsig if n not in init and n not in fwd]
    assert not missing, f"{module.__name__} lacks {missing}"
    for n, p in fsig.items():
        if n in init:
            assert init[n].default == p.default, f"{module.__name__}({n}=) default differs"
    assert hasattr(xent_triton, module.__name__) and module.__name__ in xent_triton.__all__


DISTILL = [
    dict(),
    dict(divergence="reverse_kl", temperature=2.0, reduction="sum"),
    dict(divergence="jsd", beta=0.3, temperature=0.5, reduction="none", ce_weight=0.4),
    dict(ignore_index=3, empty_batch="zero", ce_weight=1.0),
    dict(divergence="jsd", softcap=2.0, temperature=2.0, ce_weight=0.3, token_weight=True),
    dict(divergence="reverse_kl", softcap=5.0, reduction="none", token_weight=True),
]
LOGPROBS = [dict(), dict(temperature=0.7, return_entropy=True),
            dict(softcap=3.0, temperature=0.5, return_entropy=True, token_weight=True)]


def _grads(fn, leaves, gen):
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    ups = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    torch.autograd.backward(list(outs), ups)
    return [o.detach() for o in outs], [leaf.grad.clone() for leaf in leaves]


def _same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("opts", DISTILL + [dict(chunk_size=2, softcap=3.0, token_weight=True)], ids=str)
def test_distillation_modules_equal_functions(opts, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the torch path: fast, and the same code
    gen = torch.Generator().manual_seed(0)
    opts = dict(opts)
    tw = torch.rand(2, 3, generator=gen) + 0.5 if opts.pop("token_weight", False) else None  # forward's
    s, t = torch.randn(2, 3, 11, generator=gen), torch.randn(2, 3, 11, generator=gen)
    lbl = torch.randint(0, 11, (2, 3), generator=gen)
    lbl[0, 0] = -100 if opts.get("ignore_index", -100) == -100 else opts["ignore_index"]
    hs, ws, ht, wt = (
        torch.randn(*shape, generator=gen) for shape in ((2, 3, 5), (11, 5), (2, 3, 4), (11, 4))
    )
    bs, bt = torch.randn(11, generator=gen), torch.randn(11, generator=gen)
    if "chunk_size" not in opts:
        leaves = [s.clone().requires_grad_() for _ in range(2)]
        got = _grads(
            lambda: DistillationLoss(**opts)(leaves[0], t, lbl, tw), leaves[:1],
            torch.Generator().manual_seed(1)
        )
        want = _grads(
            lambda: distillation_loss(leaves[1], t, lbl, token_weight=tw, **opts), leaves[1:],
            torch.Generator().manual_seed(1)
        )
        _same(got[0] + got[1], want[0] + want[1])
    lv = [[x.clone().requires_grad_() for x in (hs, ws, bs)] for _ in range(2)]
    got = _grads(
        lambda: LinearDistillationLoss(**opts)(lv[0][0], lv[0][1], ht, wt, lbl, lv[0][2], bt, tw),
        lv[0],
        torch.Generator().manual_seed(2),
    )
    want = _grads(
        lambda: linear_distillation_loss(
            lv[1][0], lv[1][1], ht, wt, lbl, linear_bias=lv[1][2], teacher_linear_bias=bt, token_weight=tw,
            **opts
        ),
        lv[1],
        torch.Generator().manual_seed(2),
    )
    _same(got[0] + got[1], want[0] + want[1])


@pytest.mark.parametrize("opts", LOGPROBS + [dict(chunk_size=4, return_entropy=True, softcap=2.0)], ids=str)
def test_logprob_modules_equal_functions(opts, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(3)
    opts = dict(opts)
    tw = torch.rand(2, 3, generator=gen) + 0.5 if opts.pop("token_weight", False) else None  # forward's
    x, tok = torch.randn(2, 3, 11, generator=gen), torch.randint(0, 11, (2, 3), generator=gen)
    h, w, b = (
        torch.randn(2, 3, 5, generator=gen),
        torch.randn(11, 5, generator=gen),
        torch.randn(11, generator=gen),
    )
    if "chunk_size" not in opts:
        leaves = [x.clone().requires_grad_() for _ in range(2)]
        got = _grads(
            lambda: TokenLogprobs(**opts)(leaves[0], tok, tw), leaves[:1], torch.Generator().manual_seed(4)
        )
        want = _grads(
            lambda: token_logprobs(leaves[1], tok, token_weight=tw, **opts), leaves[1:],
            torch.Generator().manual_seed(4)
        )
        _same(got[0] + got[1], want[0] + want[1])
    lv = [[t.clone().requires_grad_() for t in (h, w, b)] for _ in range(2)]
    got = _grads(
        lambda: LinearTokenLogprobs(**opts)(lv[0][0], lv[0][1], tok, lv[0][2], tw),
        lv[0],
        torch.Generator().manual_seed(5),
    )
    want = _grads(
        lambda: linear_token_logprobs(lv[1][0], lv[1][1], tok, linear_bias=lv[1][2], token_weight=tw, **opts),
        lv[1],
        torch.Generator().manual_seed(5),
    )
    _same(got[0] + got[1], want[0] + want[1])


@pytest.mark.parametrize(
    "module, bad",
    [
        (DistillationLoss, dict(divergence="l2")),
        (DistillationLoss, dict(beta=1.0, divergence="jsd")),
        (LinearDistillationLoss, dict(temperature=0.0)),
        (TokenLogprobs, dict(temperature=-1.0)),
        (LinearTokenLogprobs, dict(temperature=float("nan"))),
        (DistillationLoss, dict(softcap=0.0)),
        (TokenLogprobs, dict(softcap=-2.0)),
    ],
    ids=str,
)
def test_bad_option_fails_at_construction(module, bad):
    with pytest.raises(ValueError):
        module(**bad)
