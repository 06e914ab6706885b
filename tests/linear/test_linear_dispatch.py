"""linear_cross_entropy's choice between the vendor-GEMM head and the fused-epilogue head
(xent_triton/linear/dispatch.py): the default, forcing either path, refusals naming the option,
and the dispatch table's rule. Tiny shapes (the fused path runs under the interpreter)."""
import pytest
import torch

import xent_triton
from xent_triton.core.runtime import interpreting
from xent_triton.linear import dispatch, fused_head
from xent_triton.linear.dispatch import linear_path, table_prefers_fused

pytestmark = pytest.mark.skipif(not interpreting(), reason="the interpreter's CPU checks")


def _inputs(dtype=torch.bfloat16, N=12, D=16, C=40):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(C, D, generator=g) / 4).to(dtype).requires_grad_()
    y = torch.randint(0, C, (N,), generator=g)
    y[::3] = -100
    return x, w, y


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that reach the fused head."""
    calls = []
    real = fused_head.fused_head

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(xent_triton.linear.functional, "fused_head", counted)
    return calls


@pytest.mark.parametrize("how,expect", [
    (None, 0),            # auto on CPU / no table row: the vendor path
    ("env-vendor", 0),
    ("env-fused", 1),
    ("ctx-fused", 1),
    ("env-fused+ctx-vendor", 0),  # the context manager wins over the variable
])
def test_path_choice(how, expect, spy, monkeypatch):
    if how and "env-fused" in how:
        monkeypatch.setenv(dispatch.PATH_ENV, "fused")
    if how == "env-vendor":
        monkeypatch.setenv(dispatch.PATH_ENV, "vendor")
    x, w, y = _inputs()
    ctx = linear_path("fused") if how == "ctx-fused" else \
        linear_path("vendor") if how == "env-fused+ctx-vendor" else None
    if ctx is not None:
        with ctx:
            loss = xent_triton.linear_cross_entropy(x, w, y)
    else:
        loss = xent_triton.linear_cross_entropy(x, w, y)
    loss.backward()
    assert len(spy) == expect
    assert torch.isfinite(loss) and x.grad is not None and w.grad is not None


REFUSED = [  # (kwargs / input change, the name the error must carry)
    (dict(lse_square_scale=1e-3), "lse_square_scale"),
    (dict(return_lse=True), "return_lse"),
    (dict(return_stats=True), "return_stats"),
    (dict(token_weight="tw"), "token_weight"),
    (dict(grad_accum_dtype=torch.bfloat16), "grad_accum_dtype"),
    (dict(reduction="none"), "reduction"),
    (dict(dtype=torch.float32), "dtype"),
]


@pytest.mark.parametrize("kw,name", REFUSED, ids=[n for _, n in REFUSED])
def test_forced_fused_refuses_by_name(kw, name, monkeypatch):
    monkeypatch.setenv(dispatch.PATH_ENV, "fused")
    kw = dict(kw)
    x, w, y = _inputs(kw.pop("dtype", torch.bfloat16))
    if kw.get("token_weight") == "tw":
        kw["token_weight"] = torch.rand(y.shape)
    with pytest.raises(ValueError, match=name):
        xent_triton.linear_cross_entropy(x, w, y, **kw)


def test_bad_path_value_raises(monkeypatch):
    monkeypatch.setenv(dispatch.PATH_ENV, "fastest")
    x, w, y = _inputs()
    with pytest.raises(ValueError, match="XENT_LINEAR_PATH"):
        xent_triton.linear_cross_entropy(x, w, y)


def _row(N, f, path, card="H200", D=4096, C=128256):
    return dict(card=card, N=str(N), D=str(D), C=str(C), ignored=str(f), vendor_ms="1", fused_ms="1",
                path=path)


TABLE = [_row(2048, 0.0, "vendor"), _row(2048, 0.5, "fused"), _row(8192, 0.0, "fused"),
         _row(8192, 0.5, "fused"), _row(8192, 0.0, "vendor", card="H100")]


@pytest.mark.parametrize("card,N,D,C,expect", [
    ("H200", 8192, 4096, 128256, True),    # fused at every fraction
    ("H200", 6000, 4096, 128256, True),    # nearest measured N (log scale): 8192
    ("H200", 2048, 4096, 128256, False),   # vendor faster at 0 %
    ("H200", 3000, 4096, 128256, False),   # nearest: 2048
    ("H100", 8192, 4096, 128256, False),   # another card's rows
    ("H200", 8192, 4096, 32000, False),    # no row for this C
    ("A100", 8192, 4096, 128256, False),   # no row for this card
])
def test_table_rule(card, N, D, C, expect):
    assert table_prefers_fused(card, N, D, C, TABLE) is expect


def test_committed_table_has_no_measured_rows():
    """No GPU measured the fused path yet: the committed table is a header; auto = vendor."""
    assert dispatch.load_table(str(dispatch.DEFAULT_TABLE)) == []
