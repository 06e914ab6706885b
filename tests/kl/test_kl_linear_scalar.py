"""``linear_distillation_loss`` at the FLOP base of issue 20 (acceptance 1): reduction mean / sum
runs ``xent_triton::linear_distillation_scalar`` (``kl/linear_scalar.py``): per token chunk both
heads' logits formed ONCE, the student's gradients formed in forward, backward only scales them.

FLOPs (aten GEMMs + interpreted tl.dot, perf/traffic.py), forward + backward, exactly
(1 - f) N (6 D C + 2 Dt C) (a frozen W: 4 D C + 2 Dt C per token) on both CPU paths (kernels under
the interpreter; the torch path with TRITON_INTERPRET=0), one chunk or several; the per-row ops
(reduction none) keep 8 D C + 4 Dt C (tests/kl/test_kl_linear_compaction.py). Values and
gradients within the tolerance rule of the float64 composition ``distillation_loss(F.linear(...),
F.linear(...))`` (the same composition in the dtype as torch's own error) and of the per-row path;
the loss bitwise equal to the per-row path's; deterministic; one chunk allocates no fp32 (C, D)
accumulator; a second derivative raises; torch.compile(fullgraph=True, dynamic=True) traces it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from kl_compaction_cases import heads, ignored_ids
from tolerances import assert_close_rule
from xent_triton.kl import linear as kl_linear
from xent_triton.kl import linear_scalar

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's masked lanes
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
N, D, DT, C = 37, 24, 20, 201  # odd sizes
ALL, FROZEN, HEAD_ONLY = (True, True, True), (True, False, False), (False, True, True)
LINEAR_ONLY = ("chunk_size", "grad_accum_dtype")


def use_path(monkeypatch, path: str) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "triton" else "0")


def token_weight(n: int, dtype=F32) -> torch.Tensor:
    return (torch.rand(n, generator=torch.Generator().manual_seed(5)) * 1.5 + 0.25).to(dtype)


def run(t: dict, ids, need: tuple, kw: dict, g: float, tw=None, fused: bool = True) -> list:
    """(loss, dX, dW, db) of forward + backward with upstream gradient g; fused=False: the
    composition distillation_loss(F.linear(...), F.linear(...)) in the inputs' dtype."""
    leaves = [t[k].detach().clone().requires_grad_(n) for k, n in zip("hwb", need)]
    if fused:
        loss = xent_triton.linear_distillation_loss(leaves[0], leaves[1], t["ht"], t["wt"], ids,
                                                    linear_bias=leaves[2], teacher_linear_bias=t["bt"],
                                                    token_weight=tw, **kw)
    else:
        kw = {k: v for k, v in kw.items() if k not in LINEAR_ONLY}
        loss = xent_triton.distillation_loss(F.linear(*leaves), F.linear(t["ht"], t["wt"], t["bt"]), ids,
                                             token_weight=tw, **kw)
    loss.backward(torch.tensor(g, dtype=loss.dtype))
    return [loss.detach()] + [leaf.grad for leaf in leaves]


def per_row_path(monkeypatch) -> None:
    """Route linear_distillation_loss to the per-row ops (kl/linear_ops.py) for this test."""
    monkeypatch.setattr(kl_linear, "serves", lambda *a: False)


# ----------------------------------------------------------------------------------- FLOPs
def per_token_flops(need: tuple) -> int:
    """GEMM FLOPs per kept token: student logits 2 D C (+ dX 2 D C, + dW 2 D C), teacher 2 Dt C."""
    return 2 * D * C * (1 + int(need[0]) + int(need[1])) + 2 * DT * C


FLOP_CASES = [  # (reduction, path, need, chunk_size): several chunks of 12 rows, or one chunk (None)
    pytest.param("mean", "triton", ALL, 12, id="mean-triton-chunked"),
    pytest.param("mean", "torch", ALL, None, id="mean-torch-one-chunk"),
    pytest.param("sum", "triton", ALL, None, id="sum-triton-one-chunk"),
    pytest.param("sum", "torch", ALL, 12, id="sum-torch-chunked"),
    pytest.param("mean", "torch", FROZEN, 12, id="mean-torch-frozen-head"),
]


@pytest.mark.parametrize("frac", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("reduction,path,need,chunk", FLOP_CASES)
def test_scalar_distillation_flops(reduction, path, need, chunk, frac, monkeypatch, record_property):
    """FLOPs == kept tokens x per_token_flops exactly, so <= 1.02 (1 - f) (6 N D C + 2 N Dt C)."""
    from harness import traffic

    use_path(monkeypatch, path)
    n = 40
    t = heads(n, D, DT, C, F32, seed=3)
    ids = ignored_ids(n, C, frac, -100, seed=7)
    with traffic.count() as r:
        run(t, ids, need, dict(reduction=reduction, chunk_size=chunk), 0.7)
    kept = int((ids != -100).sum())
    base = n * (6 * D * C + 2 * DT * C)
    ratio = r["flops"] / base
    record_property("flop_ratio", ratio)
    print(f"\n{reduction} {path} need={need} chunk={chunk} f={frac}: flops {r['flops']} = {ratio:.4f} x base")
    assert r["flops"] == per_token_flops(need) * kept
    assert ratio <= 1.02 * (1 - frac)
    assert r["oob"] == []


# ------------------------------------------------------------------------ values, gradients
P = pytest.param
CASES = [  # (path, dtype, kwargs, need, upstream gradient, token weight)
    P("triton", F32, dict(ce_weight=0.3, chunk_size=10), ALL, 0.7, False, id="kl-ce-triton-f32-chunked"),
    P("torch", F32, dict(divergence="reverse_kl", temperature=1.7, reduction="sum"), ALL, 1.3, False,
      id="rkl-T-torch-f32-sum-one-chunk"),
    P("triton", BF16, dict(divergence="jsd", beta=0.3, softcap=4.0, chunk_size=16), ALL, 0.7, False,
      id="jsd-softcap-triton-bf16-chunked"),
    P("torch", BF16, dict(divergence="jsd", ce_weight=0.5, temperature=0.6, reduction="sum", chunk_size=9),
      ALL, 2.0, True, id="jsd-ce-T-torch-bf16-sum-token-weight"),
    P("triton", F32, dict(temperature=1.4, softcap=6.0), FROZEN, 0.7, True,
      id="kl-softcap-triton-f32-one-chunk-frozen-head-token-weight"),
    P("torch", F32, dict(divergence="reverse_kl", ce_weight=0.2, chunk_size=8), HEAD_ONLY, 0.4, False,
      id="rkl-ce-torch-f32-head-grads-only"),
    P("triton", BF16, dict(chunk_size=8, grad_accum_dtype=BF16), ALL, 1.6, False,
      id="kl-triton-bf16-accumulate-in-bf16"),
]


@pytest.mark.parametrize("path,dtype,kw,need,g,weighted", CASES)
def test_scalar_distillation_matches_float64(path, dtype, kw, need, g, weighted, monkeypatch):
    """Loss, dX, dW, db (bias) within the rule of the float64 composition, with the composition in
    ``dtype`` as torch's own error and again with the per-row path as it; loss bitwise the per-row
    path's; bitwise equal run to run."""
    use_path(monkeypatch, path)
    t = heads(N, D, DT, C, dtype, seed=11)
    ids = ignored_ids(N, C, 0.25, -100, seed=12)
    tw = token_weight(N) if weighted else None
    seen = []
    real = linear_scalar.scalar_chunks
    monkeypatch.setattr(linear_scalar, "scalar_chunks", lambda *a: seen.append(a[0].shape[0]) or real(*a))
    ours = [run(t, ids, need, kw, g, tw) for _ in range(2)]
    assert seen == [int((ids != -100).sum())] * 2, "the scalar path did not serve the call"
    theirs = run(t, ids, need, kw, g, tw, fused=False)
    ref = run({k: v.double() for k, v in t.items()}, ids, need, kw, g, tw, fused=False)
    per_row_path(monkeypatch)
    rows = run(t, ids, need, kw, g, tw)
    assert len(seen) == 2
    assert torch.equal(ours[0][0], rows[0]), "loss differs from the per-row path's"
    for name, a, th, pr, r in zip(("loss", "dX", "dW", "db"), ours[0], theirs, rows, ref):
        if r is None:
            assert a is None
            continue
        assert a.dtype == th.dtype
        assert_close_rule(name, a, th, r, dtype)
        assert_close_rule(f"{name} (per-row path)", a, pr, r, dtype)
    assert all(torch.equal(a, b) for a, b in zip(*ours) if a is not None), "not deterministic"


def test_scalar_distillation_without_target_and_leading_dims(monkeypatch):
    """No target (nothing ignored, mean over every token), (2, 9, D) hidden states, the torch path."""
    use_path(monkeypatch, "torch")
    t = heads(18, D, DT, C, F32, seed=4)
    t3 = {k: (v.view(2, 9, -1) if k in ("h", "ht") else v) for k, v in t.items()}
    ours = run(t3, None, ALL, dict(divergence="jsd", chunk_size=5), 0.9)
    ref = run({k: v.double() for k, v in t3.items()}, None, ALL, dict(divergence="jsd"), 0.9, fused=False)
    theirs = run(t3, None, ALL, dict(divergence="jsd"), 0.9, fused=False)
    for name, a, th, r in zip(("loss", "dX", "dW", "db"), ours, theirs, ref):
        assert_close_rule(name, a, th, r, F32)


@pytest.mark.parametrize("reduction,empty_batch,value", [("mean", "nan", float("nan")), ("mean", "zero", 0.0),
                                                         ("sum", "nan", 0.0)])
def test_every_token_ignored(reduction, empty_batch, value):
    """All labels ignored: the loss is NaN (mean, empty_batch "nan") or 0, the gradients 0, no GEMM."""
    from harness import traffic

    t = heads(8, D, DT, C, F32, seed=1)
    ids = torch.full((8,), -100)
    kw = dict(reduction=reduction, empty_batch=empty_batch, ce_weight=0.5, chunk_size=3)
    with traffic.count() as r:
        loss, *grads = run(t, ids, ALL, kw, 0.7)
    assert r["flops"] == 0
    assert torch.equal(loss, torch.tensor(value)) or (value != value and loss.isnan())
    assert all(g.shape == t[k].shape and (g == 0).all() for g, k in zip(grads, "hwb"))


def test_second_derivative_raises():
    """A backward with create_graph=True, differentiated again, raises (never a silent zero)."""
    t = heads(9, D, DT, C, F32, seed=2)
    h, w = (t[k].clone().requires_grad_() for k in "hw")
    loss = xent_triton.linear_distillation_loss(h, w, t["ht"], t["wt"], torch.randint(0, C, (9,)))
    gh, gw = torch.autograd.grad(loss * 0.5, (h, w), create_graph=True)
    for g in (gh, gw):
        with pytest.raises(RuntimeError, match="linear_distillation_loss: second derivatives"):
            torch.autograd.grad(g.sum(), (h, w), retain_graph=True)


def test_compile_fullgraph_dynamic(monkeypatch, tmp_path):
    """torch.compile(fullgraph=True, dynamic=True): no graph break, the scalar op serves the
    compiled call (mean and sum), within the rule of eager (floor) at two batch sizes, no recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    seen = []
    real = linear_scalar.scalar_chunks
    monkeypatch.setattr(linear_scalar, "scalar_chunks", lambda *a: seen.append(a[0].shape[0]) or real(*a))

    def step(h, w, ht, wt, y, tw):
        mean = xent_triton.linear_distillation_loss(h, w, ht, wt, y, divergence="jsd", ce_weight=0.2,
                                                    token_weight=tw, chunk_size=7)
        return mean * 1.5 + xent_triton.linear_distillation_loss(h, w, ht, wt, y, reduction="sum") * 0.1

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=cnt, fullgraph=True, dynamic=True)
    first = None
    for n in (19, 13):
        t = heads(n, D, DT, 64, F32, seed=n)
        y, tw = ignored_ids(n, 64, 0.3, -100, seed=n), token_weight(n)
        runs = []
        for fn in (compiled, step):
            h, w = (t[k].clone().requires_grad_() for k in "hw")
            out = fn(h, w, t["ht"], t["wt"], y, tw)
            out.backward()
            runs.append((out.detach(), h.grad, w.grad))
        for a, b in zip(*runs):
            assert_close_rule("compiled", a, None, b, F32)
        first = cnt.frame_count if first is None else first
    assert cnt.frame_count == first, f"recompiled: {first} -> {cnt.frame_count} graphs"
    assert len(seen) == 8, seen  # 2 losses x (compiled, eager) x 2 sizes, every one on the scalar op


# --------------------------------------------------------------------------------- memory
def test_one_chunk_dw_has_no_fp32_accumulator(monkeypatch, record_property):
    """bf16, the torch path: peak extra bytes from C to 2C grow by at most 2 bytes per added C·D
    element (dW once, in w's dtype) beyond the two logit buffers and the torch twin's fp32
    temporaries (64 bytes per added kept logit, generous): no fp32 (C, D) accumulator, no scaled
    copy in backward. The same call in chunks of 4 rows (an fp32 accumulator, + 4 B per C·D) fails
    that bound (shown below: the measure can fail)."""
    from harness import traffic
    from xent_triton.linear import cpu_gemm

    use_path(monkeypatch, "torch")
    monkeypatch.setattr(cpu_gemm, "BLOCK_ELEMS", 1 << 14)  # the fp32 GEMMs' blocks: constant in C
    n, d, c = 16, 512, 512

    def step_for(cc: int, chunk):
        t = heads(n, d, 8, cc, BF16, seed=9)
        ids = ignored_ids(n, cc, 0.0, -100, seed=9)
        h, w, b = (t[k].requires_grad_() for k in "hwb")

        def step():
            loss = xent_triton.linear_distillation_loss(h, w, t["ht"], t["wt"], ids, linear_bias=b,
                                                        teacher_linear_bias=t["bt"], chunk_size=chunk)
            loss.backward(torch.tensor(0.5))
            for leaf in (h, w, b):
                leaf.grad = None
        return step

    def growth(chunk) -> float:
        peaks = []
        for cc in (c, 2 * c):
            step = step_for(cc, chunk)
            step()  # warm-up
            peaks.append(traffic.peak_extra_bytes(step))
        return (peaks[1] - peaks[0] - n * c * 64) / (c * d)

    one, several = growth(None), growth(4)
    record_property("bytes_per_CD", (one, several))
    print(f"\nbytes per added C·D beyond the workspace: one chunk {one:.3f}, chunks of 4 {several:.3f}")
    assert 0 < one <= 2.0
    assert several > 2.0


def test_opcheck():
    """The op's schema, fake implementation and autograd registration (torch.library.opcheck)."""
    from xent_triton.kl.options import make_kl

    t = heads(9, D, DT, 50, F32, seed=6)
    ids = ignored_ids(9, 50, 0.3, -100, seed=6)
    opts = make_kl(divergence="jsd", ce_weight=0.3, softcap=5.0, chunk_size=4)
    args = (t["h"].requires_grad_(), t["w"].requires_grad_(), t["b"], t["ht"], t["wt"], t["bt"], ids,
            token_weight(9), True, True, False)
    torch.library.opcheck(torch.ops.xent_triton.linear_distillation_scalar.default, args, opts.flat(),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
