"""The ``nn.Module`` forms hand every argument of their function to it (issue 17: "a module accepts
every option of its function"): the plumbing of each public module with a distinct sentinel per
argument, then the options the CE modules gained (``return_stats``, ``return_predicted``,
``token_weight``; ``chunk_size``, ``grad_accum_dtype``) against the functional form on both CPU paths,
and their validation at construction. The signatures themselves: ``test_naming.py``."""
from __future__ import annotations

import inspect

import pytest
import torch

import xent_triton as xt
from naming_rules import is_tensor, module_pairs, params
from xent_triton import parallel

PATHS = [pytest.param("1", id="triton"), pytest.param("0", id="torch")]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", request.param)
    return request.param


PAIRS = module_pairs()


@pytest.mark.parametrize("name,module,fn,owned,extra", PAIRS, ids=[p[0] for p in PAIRS])
def test_module_hands_every_argument_to_its_function(name, module, fn, owned, extra, monkeypatch):
    """Each argument of the function reaches it from the module, by the module's constructor option
    (attribute) or ``forward`` argument of the same name: a distinct sentinel per argument."""
    calls = []
    forward = inspect.unwrap(module.forward)
    monkeypatch.setitem(forward.__globals__, fn.__name__, lambda *a, **k: calls.append((a, k)))
    sentinel = {p.name: torch.empty(0) if is_tensor(p) else object() for p in params(fn)}
    per_call = [p.name for p in params(forward)]
    if module is parallel.FusedLMHead:
        crit = module(5, 7, bias=True, **{n: v for n, v in sentinel.items() if n not in per_call + list(owned)
                                          and n != "token_weight"})
        per_call.append("token_weight")  # a per-call tensor of its **options
        sentinel.update(linear_weight=crit.weight, linear_bias=crit.bias)
    else:
        crit = module()
        for n in [p.name for p in params(module.__init__)]:
            setattr(crit, n, sentinel[n])
    crit(**{n: sentinel[n] for n in per_call})
    (args, kwargs), = calls
    bound = inspect.signature(fn).bind(*args, **kwargs).arguments
    wrong = [n for n in sentinel if bound.get(n, "not passed") is not sentinel[n]]
    assert wrong == [], f"{name} does not hand {wrong} to {fn.__name__}"


def _inputs(N=13, C=37, D=9, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(C, D, generator=g) * (3.0 / D ** 0.5)).to(dtype)
    z = (torch.randn(N, C, generator=g) * 2).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    y[::5] = -100
    tw = torch.rand(N, generator=g) * 1.5 + 0.25
    return x, w, z, y, tw


def _run(call, *inputs, **kw):
    """The loss (or loss and stats), and the gradients of the float inputs at upstream gradient 0.7."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = call(*leaves, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    (loss * 0.7).sum().backward()
    return out, [t.grad for t in leaves if t.grad is not None]


def _tensors(out):
    """The tensors of a result: the loss, or the loss and the LossStats / lse of a tuple."""
    if isinstance(out, tuple):
        return [t for part in out for t in _tensors(part)]
    return [] if out is None else [out]


def _assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    pairs = list(zip(_tensors(out_a) + grads_a, _tensors(out_b) + grads_b, strict=True))
    assert pairs
    for u, v in pairs:
        torch.testing.assert_close(u, v, rtol=0, atol=0)


CE_CASES = [  # constructor options, forward tensors' names
    ({"return_stats": True, "return_predicted": True, "label_smoothing": 0.1}, ()),
    ({"reduction": "sum"}, ("token_weight",)),
    ({"return_stats": True, "return_predicted": True, "reduction": "none"}, ("token_weight",)),
]


@pytest.mark.parametrize("options,tensors", CE_CASES, ids=[str(i) for i in range(len(CE_CASES))])
def test_cross_entropy_module_equals_function(path, options, tensors):
    _, _, z, y, tw = _inputs()
    extra = {"token_weight": tw} if tensors else {}
    got = _run(xt.CrossEntropyLoss(**options), z, y, **extra)
    want = _run(xt.cross_entropy, z, y, **options, **extra)
    _assert_same(got, want)


LINEAR_CASES = [
    {"chunk_size": 4},
    {"chunk_size": 5, "grad_accum_dtype": torch.bfloat16, "reduction": "sum"},
    {"grad_accum_dtype": torch.float32, "return_stats": True},
]


@pytest.mark.parametrize("options", LINEAR_CASES, ids=[str(i) for i in range(len(LINEAR_CASES))])
def test_linear_module_equals_function(path, options):
    x, w, _, y, _ = _inputs(dtype=torch.bfloat16)
    got = _run(xt.LinearCrossEntropyLoss(**options), x, w, y)
    want = _run(xt.linear_cross_entropy, x, w, y, **options)
    _assert_same(got, want)


@pytest.mark.parametrize("options,fragment", [
    ({"chunk_size": -3}, "chunk_size must be a positive int"),
    ({"chunk_size": 2.0}, "chunk_size must be a positive int"),
    ({"grad_accum_dtype": torch.int64}, "grad_accum_dtype must be None"),
    ({"grad_accum_dtype": "float32"}, "grad_accum_dtype must be None"),
], ids=["negative-chunk", "float-chunk", "int-dtype", "str-dtype"])
def test_linear_module_rejects_bad_chunking_at_construction(options, fragment):
    with pytest.raises(ValueError, match=fragment):
        xt.LinearCrossEntropyLoss(**options)


def test_linear_module_checks_grad_accum_dtype_against_the_head_at_the_call():
    """bfloat16 may be the head's dtype, so construction accepts it; a float32 head refuses it."""
    x, w, _, y, _ = _inputs()
    crit = xt.LinearCrossEntropyLoss(grad_accum_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="grad_accum_dtype must be None"):
        crit(x, w, y)
