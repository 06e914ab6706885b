"""Ignored tokens cost no FLOPs in the KL family's linear forms (issue 20, acceptance 1): the chunked
ops of ``kl/linear_ops.py`` compact the rows whose label (``linear_distillation_loss``) or token
(``linear_token_logprobs``) is ``ignore_index`` away before the GEMMs, forward and backward.

FLOPs (aten GEMMs + interpreted tl.dot, perf/traffic.py) with a fraction f of the tokens ignored:
exactly the kept tokens' share of the code's own per-token count (tests/harness/kl_compaction_cases.py:
log-probs 8 D C, distillation 8 D C + 4 Dt C, the teacher formed in forward and again in backward),
so <= 1.02 (1 - f) x the base at f = 0, on both CPU paths (kernels under the interpreter, the torch
path with TRITON_INTERPRET=0). Results: within the tolerance rule of the uncompacted run
(XENT_COMPACT=0; distillation) or of torch (log-probs), ignored rows exactly 0, bitwise equal run to
run; torch.compile(fullgraph=True, dynamic=True) traces both heads once.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from kl_compaction_cases import flops_per_token, heads, ignored_ids, ref_distill_rows, ref_logprobs
from tolerances import assert_close_rule
from xent_triton.kl.linear_ops import linear_logprobs_rows
from xent_triton.kl.options import make_kl

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's masked lanes
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
N, D, DT, C = 40, 32, 24, 256
IGN_LP = 5  # the log-prob tests' ignore id: a class id (any int works as for the CE heads)


def use_path(monkeypatch, path: str) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "triton" else "0")


def run(fn: str, t: dict, ids: torch.Tensor, need: tuple, kw: dict) -> list:
    """Forward + backward (upstream != 1) of one linear form; [outputs..., grads of h, w, b]."""
    leaves = [t[k].detach().clone().requires_grad_(n) for k, n in zip("hwb", need)]
    if fn == "distill":
        outs = [xent_triton.linear_distillation_loss(leaves[0], leaves[1], t["ht"], t["wt"], ids,
                                                     linear_bias=leaves[2], teacher_linear_bias=t["bt"],
                                                     reduction="none", **kw)]
    else:
        opts = make_kl(ignore_index=IGN_LP, return_entropy=True, **kw)
        outs = list(linear_logprobs_rows(leaves[0], leaves[1], leaves[2], ids, opts)[:2])
    ups = [torch.linspace(0.3, 1.7, o.numel()).to(o.dtype) * (i + 1) for i, o in enumerate(outs)]
    torch.autograd.backward(outs, ups)
    return [o.detach() for o in outs] + [leaf.grad for leaf in leaves]


def flops(fn: str, frac: float, need: tuple, chunk: int, dtype=F32) -> tuple[int, int]:
    """(GEMM FLOPs of forward + backward, kept tokens)."""
    from harness import traffic

    ign = -100 if fn == "distill" else IGN_LP
    ids = ignored_ids(N, C, frac, ign, seed=7)
    t = heads(N, D, DT, C, dtype, seed=3)
    with traffic.count() as r:
        run(fn, t, ids, need, dict(chunk_size=chunk))
    return r["flops"], int((ids != ign).sum())


ALL, FROZEN = (True, True, True), (True, False, False)
FLOP_CASES = [  # (fn, path, need, chunk_size): several chunks of 12 rows, or one chunk
    pytest.param(fn, path, ALL, 12, id=f"{fn}-{path}-chunked")
    for fn in ("distill", "logprobs") for path in ("triton", "torch")
] + [
    pytest.param("distill", "triton", FROZEN, 12, id="distill-triton-frozen-head"),
    pytest.param("logprobs", "torch", FROZEN, 12, id="logprobs-torch-frozen-head"),
    pytest.param("distill", "torch", ALL, N, id="distill-torch-one-chunk"),
    pytest.param("logprobs", "triton", ALL, N, id="logprobs-triton-one-chunk"),
]


@pytest.mark.parametrize("frac", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("fn,path,need,chunk", FLOP_CASES)
def test_ignored_tokens_cost_no_flops(fn, path, need, chunk, frac, monkeypatch, record_property):
    """FLOPs == flops_per_token x the kept tokens exactly, so <= 1.02 (1 - f) x the base (f = 0)."""
    use_path(monkeypatch, path)
    got, kept = flops(fn, frac, need, chunk)
    per = flops_per_token(fn, D, DT, C, need_dw=need[1], need_dx=need[0])
    base = per * N
    ratio = got / base
    record_property("flop_ratio", ratio)
    print(f"\n{fn} {path} need={need} chunk={chunk} f={frac}: flops {got} = {ratio:.4f} x base")
    assert got == per * kept
    assert ratio <= 1.02 * (1 - frac)


P = pytest.param
DISTILL_CASES = [  # (path, dtype, kwargs, gradients asked for)
    P("triton", F32, dict(divergence="kl", ce_weight=0.3, chunk_size=12), ALL, id="kl-ce-triton-chunked"),
    P("torch", F32, dict(divergence="reverse_kl", temperature=1.7, chunk_size=7), FROZEN,
      id="rkl-torch-chunked-frozen-head"),
    P("triton", BF16, dict(divergence="jsd", beta=0.3, softcap=4.0), FROZEN,
      id="jsd-softcap-triton-bf16-frozen-head"),
    P("torch", F32, dict(divergence="jsd", ce_weight=0.5, temperature=0.6), ALL, id="jsd-ce-torch-one-chunk"),
]


@pytest.mark.parametrize("path,dtype,kw,need", DISTILL_CASES)
def test_distillation_compacted_equals_uncompacted(path, dtype, kw, need, monkeypatch):
    """Half the labels ignored: per-token loss and dX, dW, db of the compacted run within the rule
    of float64 truth with the uncompacted run (XENT_COMPACT=0) as the dtype's own error; ignored
    rows exactly 0; bitwise equal run to run."""
    use_path(monkeypatch, path)
    t = heads(N, D, DT, C, dtype, seed=11)
    ids = ignored_ids(N, C, 0.5, -100, seed=12)
    ours = [run("distill", t, ids, need, kw) for _ in range(2)]
    monkeypatch.setenv("XENT_COMPACT", "0")
    theirs = run("distill", t, ids, need, kw)
    t64 = {k: v.double() for k, v in t.items()}
    ref = run_ref_distill(t64, ids, need, kw)
    for name, a, th, r in zip(("loss", "dX", "dW", "db"), ours[0], theirs, ref):
        if r is None:
            assert a is None and th is None
            continue
        assert_close_rule(name, a, th, r, dtype)
    assert all(torch.equal(a, b) for a, b in zip(ours[0], ours[1]) if a is not None), "not deterministic"
    assert (ours[0][0][ids == -100] == 0).all() and (ours[0][1][ids == -100] == 0).all()


def run_ref_distill(t: dict, ids, need, kw) -> list:
    leaves = [t[k].clone().requires_grad_(n) for k, n in zip("hwb", need)]
    cap = kw.get("softcap")
    zs, zt = F.linear(*leaves), F.linear(t["ht"], t["wt"], t["bt"])
    if cap:
        zs, zt = cap * torch.tanh(zs / cap), cap * torch.tanh(zt / cap)
    loss = ref_distill_rows(zs, zt, ids, kw.get("divergence", "kl"), kw.get("beta", 0.5),
                            kw.get("temperature", 1.0), kw.get("ce_weight", 0.0), -100)
    loss.backward(torch.linspace(0.3, 1.7, loss.numel()).to(loss.dtype))
    return [loss.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("path,chunk", [("triton", 9), ("torch", N), ("torch", 9), ("triton", N)])
def test_logprobs_compacted_match_torch(path, chunk, monkeypatch):
    """Half the tokens ignored (ignore_index a class id): log-probs, entropy, dX, dW, db within the
    rule of float64 truth (torch in fp32 as the dtype's error); ignored rows exactly 0 (outputs and
    dX); bitwise equal run to run."""
    use_path(monkeypatch, path)
    t = heads(N, D, DT, C, F32, seed=21)
    ids = ignored_ids(N, C, 0.5, IGN_LP, seed=22)
    kw = dict(temperature=0.8, chunk_size=chunk)
    ours = [run("logprobs", t, ids, ALL, kw) for _ in range(2)]
    refs = []
    for dt in (F32, F64):
        leaves = [t[k].to(dt).clone().requires_grad_() for k in "hwb"]
        outs = ref_logprobs(F.linear(*leaves), ids, 0.8, IGN_LP)
        torch.autograd.backward(outs, [torch.linspace(0.3, 1.7, N).to(dt) * (i + 1) for i in range(2)])
        refs.append([o.detach() for o in outs] + [leaf.grad for leaf in leaves])
    for name, a, th, r in zip(("logprob", "entropy", "dX", "dW", "db"), ours[0], *refs):
        assert_close_rule(name, a, th, r, F32)
    assert all(torch.equal(a, b) for a, b in zip(*ours)), "not deterministic"
    ign = ids == IGN_LP
    assert (ours[0][0][ign] == 0).all() and (ours[0][1][ign] == 0).all() and (ours[0][2][ign] == 0).all()


def test_every_token_ignored():
    """All tokens ignored: zero outputs and gradients, no GEMM at all (both heads)."""
    from harness import traffic

    t = heads(8, D, DT, C, F32, seed=1)
    for fn, ign in (("distill", -100), ("logprobs", IGN_LP)):
        ids = torch.full((8,), ign)
        with traffic.count() as r:
            res = run(fn, t, ids, ALL, dict(chunk_size=3))
        assert r["flops"] == 0
        assert all((g == 0).all() for g in res)


def test_compile_dynamic_traces_compacting_linear_forms_once():
    """torch.compile(fullgraph=True, dynamic=True) of both linear forms: the compaction's host sync
    lives inside the custom ops (fixed output shapes): batches with other sizes and other ignored
    counts run without a recompile, bitwise equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def step(h, w, ht, wt, y, tok):
        loss = xent_triton.linear_distillation_loss(h, w, ht, wt, y, divergence="jsd", ce_weight=0.2)
        lp, ent = xent_triton.linear_token_logprobs(h, w, tok, return_entropy=True, chunk_size=8)
        return loss * 1.5 + (lp * 0.7).sum() + ent.sum() * 0.1

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=cnt, fullgraph=True, dynamic=True)
    first = None
    for n, frac in ((20, 0.25), (20, 0.75), (17, 0.5)):  # no size equal to D, Dt or C
        t = heads(n, D, DT, 64, F32, seed=n)
        y, tok = ignored_ids(n, 64, frac, -100, seed=n), ignored_ids(n, 64, 1 - frac, -100, seed=n + 1)
        runs = []
        for fn in (compiled, step):
            h, w = (t[k].clone().requires_grad_() for k in "hw")
            out = fn(h, w, t["ht"], t["wt"], y, tok)
            out.backward()
            runs.append((out.detach(), h.grad, w.grad))
        assert all(torch.equal(a, b) for a, b in zip(*runs))
        first = cnt.frame_count if first is None else first
    assert cnt.frame_count == first, f"recompiled: {first} -> {cnt.frame_count} graphs"


def test_compiled_linear_forms_compact(monkeypatch):
    """Under torch.compile the ops still compact at run time: the chunk loops (forward, backward;
    the mean distillation's one loop of kl/linear_scalar.py) see the kept rows only (a dispatch
    mode cannot count FLOPs inside a compiled graph)."""
    from xent_triton.kl import linear_ops, linear_scalar

    seen = []
    for mod, name in ((linear_scalar, "scalar_chunks"), (linear_ops, "logprobs_chunks"),
                      (linear_ops, "logprobs_grads")):
        def spy(*args, _f=getattr(mod, name), _n=name, **kw):
            seen.append((_n, args[0].shape[0]))
            return _f(*args, **kw)
        monkeypatch.setattr(mod, name, spy)
    t = heads(N, D, DT, 64, F32, seed=5)
    y, tok = ignored_ids(N, 64, 0.75, -100, seed=6), ignored_ids(N, 64, 0.5, -100, seed=7)

    def step(h, w):
        lp = xent_triton.linear_token_logprobs(h, w, tok, chunk_size=12)
        return xent_triton.linear_distillation_loss(h, w, t["ht"], t["wt"], y, chunk_size=12) + lp.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    h, w = (t[k].clone().requires_grad_() for k in "hw")
    compiled(h, w).backward()
    ky, kt = int((y != -100).sum()), int((tok != -100).sum())
    assert sorted(seen) == sorted([("scalar_chunks", ky), ("logprobs_chunks", kt), ("logprobs_grads", kt)])
