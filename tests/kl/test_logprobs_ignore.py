"""``ignore_index`` of the log-prob heads (issue 20): ``token_logprobs`` / ``linear_token_logprobs``
and their row launchers (``kl/ops.py``, the contract of the linear forms' chunks), on both CPU paths
(the Triton kernels under the interpreter, the torch twins of ``kl/rows_torch.py``).

An ignored position (target == ignore_index: -100, or a valid class id such as 7) returns log-prob 0
and entropy 0 exactly, and its row gets an exactly zero gradient (through both outputs, whatever its
upstream gradient and token weight); every other row is BITWISE what a batch without the ignored rows
gives, and all of it follows the tolerance rule against float64 torch (masked). Any other
out-of-range target still raises IndexError on CPU (NaN from the kernel). The bytes moved (the logits
form, interpreter): <= (3 - 2f)x the logits + O(N) with a gradient, (1 - f)x + O(N) without.
torch.compile(fullgraph=True, dynamic=True): one graph, no recompile across ignored fractions.
Ids read dtype-outputs-options-fraction-ignore_index.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from tolerances import assert_close_rule
from xent_triton.kl.ops import logprobs_backward_into, logprobs_forward_rows
from xent_triton.kl.options import KLOptions

# the interpreter evaluates both branches of tl.where on numpy (masked lanes warn there)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
SHAPE, C = (3, 7), 301  # 21 positions, an odd vocabulary
PATHS = [pytest.param("1", id="kernel"), pytest.param("0", id="torch")]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", request.param)
    return request.param


@dataclasses.dataclass
class Case:
    id: str
    dtype: torch.dtype
    entropy: bool
    frac: float  # fraction of the positions ignored
    ign: int = -100
    temperature: float = 1.0
    softcap: Optional[float] = None
    token_weight: bool = False
    chunk_size: Optional[int] = None  # linear form only


CASES = [
    Case("fp32-ent-f0.5", F32, True, 0.5),
    Case("bf16-lp-T0.7-f0.5", BF16, False, 0.5, temperature=0.7),
    Case("fp32-ent-cap4-T1.3-f0.5-ign7", F32, True, 0.5, ign=7, temperature=1.3, softcap=4.0),
    Case("bf16-ent-tw-f0.5", BF16, True, 0.5, token_weight=True),
    Case("fp32-lp-cap3-tw-f0.5-ign7", F32, False, 0.5, ign=7, softcap=3.0, token_weight=True),
    Case("fp32-ent-f0-ign7", F32, True, 0.0, ign=7),
    Case("bf16-ent-T2-f0", BF16, True, 0.0, temperature=2.0),
    Case("fp32-ent-cap3-tw-f1", F32, True, 1.0, softcap=3.0, token_weight=True),
    Case("bf16-lp-f1-ign7", BF16, False, 1.0, ign=7),
]
LINEAR_CASES = [
    Case("fp32-ent-T0.7-f0.5-chunk4", F32, True, 0.5, temperature=0.7, chunk_size=4),
    Case("bf16-lp-cap3-tw-f0.5-ign7", BF16, False, 0.5, ign=7, softcap=3.0, token_weight=True),
    Case("fp32-ent-f1-ign7-chunk5", F32, True, 1.0, ign=7, chunk_size=5),
    Case("fp32-ent-cap4-tw-f0.5-ign7-chunk4", F32, True, 0.5, ign=7, softcap=4.0, token_weight=True,
         chunk_size=4),
]


def targets(c: Case, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets with round(frac N) positions = c.ign, the kept mask); no kept target equals c.ign."""
    y = torch.randint(0, C - 1, SHAPE, generator=gen)
    y = torch.where(y >= c.ign, y + 1, y) if 0 <= c.ign < C else y  # never the ignore id by chance
    n = SHAPE[0] * SHAPE[1]
    drop = torch.randperm(n, generator=gen)[:round(c.frac * n)]
    y.view(-1)[drop] = c.ign
    return y, y != c.ign


def options(c: Case) -> dict:
    return dict(temperature=c.temperature, return_entropy=c.entropy, softcap=c.softcap)


def backward(outs: tuple, ups: list) -> None:
    torch.autograd.backward(list(outs), [u.to(o.dtype) for o, u in zip(outs, ups)])


def composed(z: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, c: Case, tw) -> tuple:
    """float64 / same-dtype torch truth: log softmax(cap(z) / T)[y] (and entropy), 0 where ignored."""
    z = c.softcap * torch.tanh(z / c.softcap) if c.softcap else z
    logq = F.log_softmax(z / c.temperature, -1)
    outs = [logq.gather(-1, torch.where(keep, y, 0)[..., None])[..., 0]]
    if c.entropy:
        outs.append(-(logq.exp() * logq).sum(-1))
    outs = [torch.where(keep, o, torch.zeros((), dtype=o.dtype)) for o in outs]
    return tuple(o if tw is None else o * tw.to(o.dtype) for o in outs)


def setup(c: Case, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    y, keep = targets(c, gen)
    ups = [torch.randn(SHAPE, generator=gen) * 2 - 0.5 for _ in range(2 if c.entropy else 1)]  # != 1
    tw = torch.rand(SHAPE, generator=gen) + 0.5 if c.token_weight else None
    return gen, y, keep, ups, tw


def assert_ignored_zero(outs: tuple, keep: torch.Tensor, grads: list) -> None:
    for o in outs:
        assert (o[~keep] == 0).all(), "an ignored position's output is not 0"
    for g in grads:
        assert (g[~keep] == 0).all(), "an ignored position's row got a gradient"


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_token_logprobs_ignored_positions(c: Case, path):
    gen, y, keep, ups, tw = setup(c)
    x = (torch.randn(*SHAPE, C, generator=gen) * 3).to(c.dtype)
    leaf = x.clone().requires_grad_()
    outs = xent_triton.token_logprobs(leaf, y, ignore_index=c.ign, token_weight=tw, **options(c))
    outs = outs if c.entropy else (outs,)
    backward(outs, ups)
    assert_ignored_zero(outs, keep, [leaf.grad])
    if keep.any():  # the valid rows alone, in a batch of their own: bitwise the same
        sub = x[keep].clone().requires_grad_()
        alone = xent_triton.token_logprobs(sub, y[keep], token_weight=None if tw is None else tw[keep],
                                           **options(c))
        alone = alone if c.entropy else (alone,)
        backward(alone, [u[keep] for u in ups])
        for o, a in zip(outs, alone):
            assert torch.equal(o[keep], a), "a valid row changed"
        assert torch.equal(leaf.grad[keep], sub.grad)
    for dt in (F64, c.dtype):  # float64 truth and torch's own error in the same dtype
        ref_leaf = x.detach().to(dt).requires_grad_()
        ref = composed(ref_leaf, y, keep, c, tw)
        backward(ref, ups)
        if dt == F64:
            truth, truth_grad = ref, ref_leaf.grad
        else:
            for i, (o, t, r) in enumerate(zip(outs, ref, truth)):
                assert_close_rule(f"output {i}", o, t, r, c.dtype)
            assert_close_rule("grad", leaf.grad, ref_leaf.grad, truth_grad, c.dtype)


@pytest.mark.parametrize("c", LINEAR_CASES, ids=lambda c: c.id)
def test_linear_token_logprobs_ignored_positions(c: Case, path):
    """dX rows of ignored positions exactly 0; dW, db exactly as if those rows were absent (vs the
    masked float64 composition, whose ignored rows contribute nothing)."""
    gen, y, keep, ups, tw = setup(c)
    D = 6
    h = torch.randn(*SHAPE, D, generator=gen).to(c.dtype)
    w = (torch.randn(C, D, generator=gen) * 0.8).to(c.dtype)
    b = torch.randn(C, generator=gen).to(c.dtype)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    outs = xent_triton.linear_token_logprobs(leaves[0], leaves[1], y, linear_bias=leaves[2],
                                             ignore_index=c.ign, token_weight=tw, chunk_size=c.chunk_size,
                                             **options(c))
    outs = outs if c.entropy else (outs,)
    backward(outs, ups)
    assert_ignored_zero(outs, keep, [leaves[0].grad])
    for dt in (F64, c.dtype):
        ref_leaves = [t.detach().to(dt).requires_grad_() for t in (h, w, b)]
        ref = composed(F.linear(*ref_leaves), y, keep, c, tw)
        backward(ref, ups)
        if dt == F64:
            truth, truth_grads = ref, [t.grad for t in ref_leaves]
            continue
        for i, (o, t, r) in enumerate(zip(outs, ref, truth)):
            assert_close_rule(f"output {i}", o, t, r, c.dtype)
        for name, g, t, r in zip(("dX", "dW", "db"), (lf.grad for lf in leaves), ref_leaves, truth_grads):
            assert_close_rule(name, g, t.grad, r, c.dtype)


@pytest.mark.parametrize("entropy", [True, False], ids=["ent", "lp"])
def test_row_launchers_contract(entropy, path):
    """``logprobs_forward_rows`` / ``logprobs_backward_into`` (the linear forms' chunk step): an
    ignored row gives lp 0, entropy 0, stats (0, 0) and a zero gradient row even under a NaN
    upstream gradient (the gradient buffer starts as NaN: every element is written) and logits up
    to 300 (e^300 overflows: the torch twin must not form it, as the kernel reads none); the kernel
    gives NaN for another out-of-range token (no range check at this level)."""
    gen = torch.Generator().manual_seed(3)
    R, ign = 9, 7
    x = torch.randn(R, C, generator=gen) * 3
    tok = torch.randint(8, C, (R,), generator=gen)
    tok[::3] = ign
    x[0] = x[0].abs() * 100  # an ignored row
    opts = KLOptions(temperature=0.8, return_entropy=entropy, ignore_index=ign)
    lp, ent, stats = logprobs_forward_rows(x, tok, opts)
    ignored = tok == ign
    assert (lp[ignored] == 0).all() and (stats[ignored] == 0).all() and not lp[~ignored].isnan().any()
    assert ent.shape == ((R,) if entropy else (0,)) and (not entropy or (ent[ignored] == 0).all())
    dlp, dent = torch.randn(R, generator=gen), torch.randn(R, generator=gen)
    dlp[ignored], dent[ignored] = float("nan"), float("inf")
    out = torch.full_like(x, float("nan"))
    logprobs_backward_into(out, x, tok, ent, stats, dlp, dent if entropy else None, opts)
    assert (out[ignored] == 0).all() and out[~ignored].isfinite().all() and (out[~ignored] != 0).any()
    if path == "1":
        bad = tok.clone()
        bad[1] = C  # out of range, not ignored
        assert logprobs_forward_rows(x, bad, opts)[0][1].isnan()


@pytest.mark.parametrize("linear", [False, True], ids=["token_logprobs", "linear_token_logprobs"])
@pytest.mark.parametrize("bad", [-100, C, -1], ids=["-100", "C", "-1"])
def test_other_out_of_range_targets_still_raise(linear, bad):
    """ignore_index=7: -100 is then an ordinary out-of-range id (today's IndexError), as are C and -1."""
    y = torch.tensor([0, 7, bad, 3])
    with pytest.raises(IndexError, match="out of bounds"):
        if linear:
            xent_triton.linear_token_logprobs(torch.randn(4, 5), torch.randn(C, 5), y, ignore_index=7)
        else:
            xent_triton.token_logprobs(torch.randn(4, C), y, ignore_index=7)


@pytest.mark.parametrize("linear", [False, True], ids=["TokenLogprobs", "LinearTokenLogprobs"])
def test_modules_take_ignore_index(linear, monkeypatch):
    """The modules pass ignore_index (as an attribute) and give the function's values bitwise."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(5)
    y = torch.randint(0, C, SHAPE, generator=gen)
    y[0, ::2] = 7
    h, w = torch.randn(*SHAPE, 5, generator=gen), torch.randn(C, 5, generator=gen)
    kw = dict(temperature=0.9, return_entropy=True, ignore_index=7)
    if linear:
        mod = xent_triton.LinearTokenLogprobs(**kw)
        got, want = mod(h, w, y), xent_triton.linear_token_logprobs(h, w, y, **kw)
    else:
        mod = xent_triton.TokenLogprobs(**kw)
        got, want = mod(h @ w.T, y), xent_triton.token_logprobs(h @ w.T, y, **kw)
    assert mod.ignore_index == 7 and "ignore_index=7" in repr(mod)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and (got[0][0, ::2] == 0).all()
    with pytest.raises(TypeError, match="ignore_index"):
        (xent_triton.LinearTokenLogprobs if linear else xent_triton.TokenLogprobs)(ignore_index=1.5)


# ------------------------------------------------------------------------------- bytes moved
N_BYTES, C_BYTES = 64, 8192
PER_ROW = 128  # bytes per row: targets, per-row lp / entropy / stats, upstream gradients, the range check


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                    reason="traffic counts Triton kernels only under the CPU interpreter")
@pytest.mark.parametrize("f, grad", [(0.5, True), (0.5, False), (0.9, True), (0.9, False)],
                         ids=["f0.5-grad", "f0.5-no_grad", "f0.9-grad", "f0.9-no_grad"])
def test_ignored_rows_are_not_read(f, grad, monkeypatch, record_property):
    """token_logprobs with entropy (bf16, C = 8192), a fraction f of the rows ignored: forward +
    backward move <= (3 - 2f)x the logits + PER_ROW * N, a forward alone <= (1 - f)x + PER_ROW * N;
    the valid rows' values and gradient are bitwise those of the run with nothing ignored."""
    from harness import traffic

    monkeypatch.setenv("XENT_POISON_OUTPUTS", "0")  # count what a real run moves (no NaN fill)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(N_BYTES, C_BYTES, generator=gen).to(BF16).requires_grad_(grad)
    full = torch.randint(0, C_BYTES, (N_BYTES,), generator=gen)
    y = full.clone()
    y[torch.randperm(N_BYTES, generator=gen)[:round(f * N_BYTES)]] = -100
    keep = y != -100
    ups = [torch.rand(N_BYTES, generator=gen) + 0.5, torch.randn(N_BYTES, generator=gen)]
    logit_bytes = N_BYTES * C_BYTES * 2
    with traffic.count() as r:
        outs = xent_triton.token_logprobs(x, y, temperature=0.7, return_entropy=True)
        if grad:
            backward(outs, ups)
    ratio = r["bytes"] / logit_bytes
    record_property(f"f={f} grad={grad}", f"{ratio:.6f}")
    print(f"\nf={f} grad={grad}: {ratio:.6f}x logits ({r['bytes']} B: read {r['kernel_read']}, write "
          f"{r['kernel_write']}, aten {r['aten_bytes']})")
    bound = (3 - 2 * f) if grad else (1 - f)
    assert r["oob"] == []
    assert r["bytes"] <= bound * logit_bytes + PER_ROW * N_BYTES, f"moved {ratio:.6f}x, bound {bound}x"
    ref_x = x.detach().clone().requires_grad_(grad)
    ref = xent_triton.token_logprobs(ref_x, full, temperature=0.7, return_entropy=True)
    assert all(torch.equal(o[keep], t[keep]) and (o[~keep] == 0).all() for o, t in zip(outs, ref))
    if grad:
        backward(ref, [torch.where(keep, u, 0.0) for u in ups])
        assert torch.equal(x.grad, ref_x.grad)


# ------------------------------------------------------------------------------- torch.compile
def test_compile_dynamic_with_ignored_tokens(path):
    """torch.compile(fullgraph=True, dynamic=True): no graph break (fullgraph), one graph for batches
    with different sizes and ignored fractions, values and gradient bitwise eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def step(x, y, g):
        lp, ent = xent_triton.token_logprobs(x, y, temperature=0.7, return_entropy=True, ignore_index=7)
        return (lp * g).sum() - 0.1 * ent.sum()

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=cnt, fullgraph=True, dynamic=True)
    first = None
    for n, ignored in ((12, 6), (17, 0), (9, 9)):
        gen = torch.Generator().manual_seed(n)
        x, g = torch.randn(n, C, generator=gen) * 2, torch.randn(n, generator=gen)
        y = torch.randint(8, C, (n,), generator=gen)
        y[:ignored] = 7
        runs = []
        for fn in (compiled, step):
            leaf = x.clone().requires_grad_()
            out = fn(leaf, y, g)
            out.backward()
            runs.append((out.detach(), leaf.grad))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
        assert (runs[0][1][:ignored] == 0).all()
        first = cnt.frame_count if first is None else first
    assert cnt.frame_count == first, f"recompiled: {first} -> {cnt.frame_count} frames"
