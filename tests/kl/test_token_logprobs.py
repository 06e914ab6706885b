"""``xent_triton.token_logprobs`` (and ``linear_token_logprobs``) against float64 torch
compositions (``log_softmax``, explicit entropy sums), with random per-token upstream gradients on
both outputs, under the tolerance rule of tests/harness/tolerances.py. Ids read shape-dtype-T-options.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from tolerances import assert_close_rule
from xent_triton.core import launch

# the interpreter evaluates both branches of tl.where on numpy: -inf - -inf, 0 * inf in the
# discarded branch warn there (masked lanes, padded classes); the results are checked below
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
DT = {F32: "fp32", BF16: "bf16", F16: "fp16", F64: "fp64"}


def composed(x, tokens, temperature):
    lq = F.log_softmax(x / temperature, -1)
    lp = lq.gather(-1, tokens[..., None])[..., 0]
    ent = -torch.where(lq > float("-inf"), lq.exp() * lq, torch.zeros((), dtype=lq.dtype)).sum(-1)
    return lp, ent


def check(x, tokens, temperature=1.0, entropy=True, use=("lp", "ent")):
    """Log-probs, entropy and the logits' gradient (random upstream per token) vs float64."""
    g_lp = torch.randn(tokens.shape, dtype=F64) if "lp" in use else torch.zeros(tokens.shape, dtype=F64)
    g_h = torch.randn(tokens.shape, dtype=F64) if "ent" in use else torch.zeros(tokens.shape, dtype=F64)

    def run(fn, xx):
        out = fn(xx)
        lp, ent = out if isinstance(out, tuple) else (out, None)
        loss = (lp.double() * g_lp).sum() if "lp" in use else 0.0
        if ent is not None and "ent" in use:
            loss = loss + (ent.double() * g_h).sum()
        loss.backward()
        return lp, ent

    ours_x = x.detach().clone().requires_grad_(True)
    lp, ent = run(lambda xx: xent_triton.token_logprobs(xx, tokens, temperature=temperature,
                                                        return_entropy=entropy), ours_x)
    ref_x = x.detach().double().requires_grad_(True)
    lp_r, ent_r = run(lambda xx: composed(xx, tokens, temperature) if entropy
                      else composed(xx, tokens, temperature)[0], ref_x)
    th_x = x.detach().clone().requires_grad_(True)
    lp_t, ent_t = run(lambda xx: composed(xx, tokens, temperature) if entropy
                      else composed(xx, tokens, temperature)[0], th_x)
    assert lp.dtype == (F64 if x.dtype == F64 else F32) and lp.shape == tokens.shape
    assert_close_rule("logprobs", lp, lp_t, lp_r, x.dtype)
    if entropy:
        assert_close_rule("entropy", ent, ent_t, ent_r, x.dtype)
    assert ours_x.grad.dtype == x.dtype
    assert_close_rule("grad", ours_x.grad, th_x.grad, ref_x.grad, x.dtype)
    return lp, ent


CASES = [
    pytest.param((8, 1000), dt, T, ent, id=f"N8-C1000-{DT[dt]}-T{T:g}-{'ent' if ent else 'lp'}")
    for dt in (F32, BF16) for T in (1.0, 2.0) for ent in (True, False)
] + [
    pytest.param((2, 3, 3001), F16, 0.7, True, id="B2xL3-C3001-fp16-T0.7-ent"),
    pytest.param((4, 50257), BF16, 1.0, True, id="N4-C50257-bf16-T1-ent"),
    pytest.param((4, 128256), F32, 0.9, True, id="N4-C128256-fp32-T0.9-ent"),
    pytest.param((6, 777), F64, 1.3, True, id="N6-C777-fp64-fallback-ent"),
    pytest.param((6, 777), F64, 1.0, False, id="N6-C777-fp64-fallback-lp"),
]


@pytest.mark.parametrize("shape,dtype,temperature,entropy", CASES)
def test_logprobs(shape, dtype, temperature, entropy):
    x = (torch.randn(shape) * 3).to(dtype)
    tokens = torch.randint(0, shape[-1], shape[:-1])
    check(x, tokens, temperature, entropy)


@pytest.mark.parametrize("use", [("lp",), ("ent",)], ids=["only-logprobs-used", "only-entropy-used"])
def test_one_output_used(use):
    x = torch.randn(5, 600)
    check(x, torch.randint(0, 600, (5,)), 1.5, True, use=use)


def test_multi_block_split_and_strided():
    wide = torch.randn(6, 2 * 1000)
    x = wide[:, ::2]
    with launch.overrides(block_c=128, backward_splits=3):
        check(x, torch.randint(0, 1000, (6,)), 2.0, True)


def test_large_logits_entropy_precise():
    """Logits ~1e4: H = log s - A/s (shifted sums) keeps the entropy exact."""
    x = torch.randn(4, 500) * 3 + 1e4
    check(x, torch.randint(0, 500, (4,)), 1.0, True)


def test_padded_minus_inf():
    x = torch.randn(3, 400)
    tokens = torch.randint(0, 300, (3,))
    ref = xent_triton.token_logprobs(x[:, :300], tokens, return_entropy=True)
    x[:, 300:] = float("-inf")
    with launch.overrides(block_c=128):
        out = xent_triton.token_logprobs(x, tokens, return_entropy=True)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph():
    x = torch.randn(4, 3, 64)
    tokens = torch.randint(0, 64, (4, 3))
    g = torch.randn(4, 3)

    def f(xx):
        lp, ent = xent_triton.token_logprobs(xx, tokens, temperature=0.8, return_entropy=True)
        return (lp * g).sum() + 0.1 * ent.sum()

    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager = f(x1)
    eager.backward()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x2)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(x2.grad, x1.grad)


ERRORS = [
    pytest.param(lambda: ((torch.randn(3, 10), torch.tensor([0, 10, 1])), {}), IndexError, "out of bounds",
                 id="token-eq-C"),
    pytest.param(lambda: ((torch.randn(3, 10), torch.tensor([0, -1, 1])), {}), IndexError, "out of bounds",
                 id="token-negative"),
    pytest.param(lambda: ((torch.randn(3, 10), torch.tensor([0, 1])), {}), ValueError, "shape",
                 id="tokens-shape"),
    pytest.param(lambda: ((torch.randn(3, 10), torch.zeros(3)), {}), TypeError, "int64", id="float-tokens"),
    pytest.param(lambda: ((torch.randn(3, 10), torch.zeros(3, dtype=torch.long)), dict(temperature=0.0)),
                 ValueError, "temperature", id="T-zero"),
    pytest.param(lambda: ((torch.randn(3, 10), torch.zeros(3, dtype=torch.long)), dict(temperature=math.nan)),
                 ValueError, "temperature", id="T-nan"),
]


@pytest.mark.parametrize("make,exc,msg", ERRORS)
def test_errors(make, exc, msg):
    args, kwargs = make()
    with pytest.raises(exc, match=msg):
        xent_triton.token_logprobs(*args, **kwargs)


# --- linear form ---------------------------------------------------------------------------------
def linear_case(N, D, C, dtype, bias, temperature, entropy, chunk):
    h = torch.randn(N, D).to(dtype)
    w = (torch.randn(C, D) / D ** 0.5 * 3).to(dtype)
    b = (torch.randn(C) * 0.1).to(dtype) if bias else None
    tokens = torch.randint(0, C, (N,))
    g_lp, g_h = torch.randn(N, dtype=F64), torch.randn(N, dtype=F64)

    def run(fn, dt):
        leaves = [None if t is None else t.detach().to(dt).requires_grad_(True) for t in (h, w, b)]
        out = fn(*leaves)
        lp, ent = out if entropy else (out, None)
        loss = (lp.double() * g_lp).sum() + ((ent.double() * g_h).sum() if entropy else 0.0)
        loss.backward()
        return (lp, ent), [None if t is None else t.grad for t in leaves]

    def ours(hh, ww, bb):
        return xent_triton.linear_token_logprobs(hh, ww, tokens, linear_bias=bb, temperature=temperature,
                                                 return_entropy=entropy, chunk_size=chunk)

    def torch_fn(hh, ww, bb):
        lp, ent = composed(F.linear(hh, ww, bb), tokens, temperature)
        return (lp, ent) if entropy else lp

    o, og = run(ours, dtype)
    r, rg = run(torch_fn, F64)
    t, tg = run(torch_fn, dtype)
    assert_close_rule("logprobs", o[0], t[0], r[0], dtype)
    if entropy:
        assert_close_rule("entropy", o[1], t[1], r[1], dtype)
    for name, a, th, rr in zip(("d_hidden", "d_weight", "d_bias"), og, tg, rg):
        if rr is not None:
            assert a.dtype == dtype
            assert_close_rule(name, a, th, rr, dtype)


LINEAR = [
    pytest.param(29, 40, 1200, F32, True, 1.0, True, 6, id="N29-D40-C1200-fp32-bias-ent-chunk6"),
    pytest.param(29, 40, 1200, BF16, False, 0.7, True, 16, id="N29-D40-C1200-bf16-T0.7-ent-chunk16"),
    pytest.param(17, 24, 999, F32, False, 2.0, False, None, id="N17-D24-C999-fp32-T2-lp"),
    pytest.param(17, 24, 999, F64, True, 1.0, True, 5, id="N17-D24-C999-fp64-fallback-ent"),
]


@pytest.mark.parametrize("N,D,C,dtype,bias,temperature,entropy,chunk", LINEAR)
def test_linear(N, D, C, dtype, bias, temperature, entropy, chunk):
    linear_case(N, D, C, dtype, bias, temperature, entropy, chunk)


def test_linear_peak_memory_has_no_n_by_c_term():
    import gc

    from harness import traffic

    N, D, C, chunk = 96, 16, 1024, 4
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(C, D, requires_grad=True)
    tokens = torch.randint(0, C, (N,))

    def step():
        lp, ent = xent_triton.linear_token_logprobs(h, w, tokens, return_entropy=True, chunk_size=chunk)
        (lp.sum() + ent.sum()).backward()
        h.grad = w.grad = None

    step()
    gc.collect()
    peak = traffic.peak_extra_bytes(step)
    budget = 2 * chunk * C * 4 + 3 * (C * D + N * D + C) * 4 + 256 * N
    print(f"\nlinear_token_logprobs peak extra {peak} B; budget {budget} B; N x C fp32 = {N * C * 4} B")
    assert peak <= budget < N * C * 4


def test_linear_compile_fullgraph():
    h, w = torch.randn(6, 16), torch.randn(64, 16)
    tokens = torch.randint(0, 64, (6,))

    def f(hh, ww):
        lp, ent = xent_triton.linear_token_logprobs(hh, ww, tokens, temperature=1.3, return_entropy=True,
                                                    chunk_size=4)
        return lp.sum() + 0.1 * ent.sum()

    e_leaves = [t.clone().requires_grad_(True) for t in (h, w)]
    c_leaves = [t.clone().requires_grad_(True) for t in (h, w)]
    eager = f(*e_leaves)
    eager.backward()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*c_leaves)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(c_leaves, e_leaves):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("extra", [False, True], ids=["plain", "softcap-token_weight"])
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
def test_bytes_moved(monkeypatch, dtype, extra):
    """Forward + backward with the entropy and per-token upstream gradients on both outputs:
    <= 3x the logits' bytes + 192 B per token (tokens + range check, per-row outputs, upstreams),
    with softcap and token_weight too."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("traffic counts Triton kernels only under the CPU interpreter")
    from harness import traffic

    monkeypatch.setenv("XENT_POISON_OUTPUTS", "0")
    N, C = 16, 4096
    x = torch.randn(N, C).to(dtype).requires_grad_(True)
    tokens = torch.randint(0, C, (N,))
    g_lp, g_h = torch.randn(N), torch.randn(N)
    with traffic.count() as r:
        more = dict(softcap=5.0, token_weight=torch.rand(N) + 0.5) if extra else {}
        lp, ent = xent_triton.token_logprobs(x, tokens, return_entropy=True, **more)
        torch.autograd.backward((lp, ent), (g_lp, g_h))
    logit_bytes = N * C * x.element_size()
    print(f"\ntoken_logprobs+entropy {DT[dtype]}{' softcap+tw' if extra else ''}: "
          f"{r['bytes'] / logit_bytes:.4f}x logits")
    assert r["bytes"] <= 3.0 * logit_bytes + 192 * N
