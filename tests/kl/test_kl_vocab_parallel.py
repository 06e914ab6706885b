"""Vocabulary-parallel ``token_logprobs`` and ``distillation_loss`` (``process_group=``) against the
single-device float64 truth on the full vocabulary.

Each world size (2 and 4 ranks, gloo on CPU) is ONE group of spawned processes
(tests/harness/kl_vocab_parallel_worker.py) running every case of the table below; per case: every rank
returned bitwise the same values; log-probs / entropies / losses and the concatenated shard
gradients follow the tolerance rule against a float64 torch composition; the collectives per call
are exactly the documented O(R) ones in forward and none in backward; a mismatched layout or
option on one rank raises on every rank (no hang: the group runs under a deadline).
"""
from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F

from kl_vp_cases import CASES, DT, F32, F64, KC, LP, MESH_CASES, OK_CASES, ROWS, D, R
from spawn_group import assert_ranks_ok, cached_spawner, run_group
from tolerances import assert_close_rule

WORKER = pathlib.Path(__file__).resolve().parents[1] / "harness" / "kl_vocab_parallel_worker.py"
SPAWN_TIMEOUT_S = 120


def _build(c: KC, seed: int) -> dict:
    gen = torch.Generator().manual_seed(1000 + seed)
    C = sum(c.sizes)
    x = (3 * torch.randn(*ROWS, C, generator=gen)).to(c.dtype)
    t = 3 * torch.randn(*ROWS, C, generator=gen)
    ids = torch.randint(0, C, ROWS, generator=gen)
    if c.labels:
        ids[torch.rand(ROWS, generator=gen) < 0.34] = -100
        ids[0, 0] = 1  # at least one valid label
    if c.fn.startswith("linear"):
        lin = dict(h=torch.randn(*ROWS, D, generator=gen).to(c.dtype),
                   w=(torch.randn(C, D, generator=gen) / 2).to(c.dtype),
                   b=torch.randn(C, generator=gen).to(c.dtype),
                   ht=torch.randn(*ROWS, DT, generator=gen), wt=torch.randn(C, DT, generator=gen),
                   bt=torch.randn(C, generator=gen))
    else:
        lin = {}
    if c.fn.endswith(LP):
        ups = [torch.randn(ROWS, generator=gen) for _ in range(2 if c.opts.get("return_entropy") else 1)]
    else:
        none = c.opts.get("reduction") == "none"
        ups = [torch.randn(ROWS, generator=gen) if none else torch.tensor(0.37)]
    return dict(x=x, t=t, ids=ids if c.fn.endswith(LP) or c.labels else None, ups=ups, **lin)


def composed(x: torch.Tensor, d: dict, c: KC) -> list:
    """The single-device torch composition (in x's dtype) on the full vocabulary."""
    o = {**dict(temperature=1.0, divergence="kl", beta=0.5, ce_weight=0.0, reduction="mean"), **c.opts}
    cap = o.get("softcap")
    tw = o.get("token_weight")
    x = cap * torch.tanh(x / cap) if cap else x
    logq = F.log_softmax(x / o["temperature"], -1)
    if c.fn.endswith(LP):
        out = [logq.gather(-1, d["ids"][..., None])[..., 0]]
        if o.get("return_entropy"):
            out.append(-(logq.exp() * logq).sum(-1))
        return out if tw is None else [v * tw.to(v.dtype) for v in out]
    t = F.linear(d["ht"], d["wt"], d["bt"]) if c.fn.startswith("linear") else d["t"]
    t = cap * torch.tanh(t.to(x.dtype) / cap) if cap else t
    logp = F.log_softmax(t.to(x.dtype) / o["temperature"], -1)
    p, q = logp.exp(), logq.exp()
    if o["divergence"] == "kl":
        div = (p * (logp - logq)).sum(-1)
    elif o["divergence"] == "reverse_kl":
        div = (q * (logq - logp)).sum(-1)
    else:
        b = o["beta"]
        logm = torch.log(b * p + (1 - b) * q)
        div = b * (p * (logp - logm)).sum(-1) + (1 - b) * (q * (logq - logm)).sum(-1)
    ok = torch.ones(ROWS, dtype=torch.bool) if d["ids"] is None else d["ids"] != -100
    loss = div
    if o["ce_weight"]:
        ce = F.cross_entropy(x.reshape(R, -1), torch.where(ok, d["ids"], 0).reshape(R), reduction="none")
        loss = o["ce_weight"] * ce.view(ROWS) + (1 - o["ce_weight"]) * div
    loss = torch.where(ok, loss, torch.zeros_like(loss))
    w = ok.to(loss.dtype) if tw is None else torch.where(ok, tw.to(loss.dtype), 0.0)
    loss = loss if tw is None else loss * tw.to(loss.dtype)
    red = {"none": loss, "sum": loss.sum(), "mean": loss.sum() / w.sum()}[o["reduction"]]
    return [red]


def run_composed(d: dict, c: KC, dtype: torch.dtype) -> tuple[list, list]:
    """(outputs, gradients): of the logits, or of (hidden, head weight, head bias)."""
    if c.fn.startswith("linear"):
        leaves = [d[k].detach().to(dtype).requires_grad_() for k in ("h", "w", "b")]
        x = F.linear(*leaves)
    else:
        leaves = [d["x"].detach().to(dtype).requires_grad_()]
        x = leaves[0]
    outs = composed(x, d, c)
    torch.autograd.backward(outs, [u.to(o.dtype) for o, u in zip(outs, d["ups"])])
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves]


def expected_calls(c: KC, r: int = R) -> list:
    """(name, op, bytes) of the forward's collectives (fp32 statistics; float64 divergence sums), r rows."""
    lin = 2 * int(c.fn.startswith("linear"))  # + input_requires_grad, kept_tokens in the agreement
    lin += int(lin > 0 and c.fn.endswith(LP)) + int(lin > 0 and c.dtensor)  # + ignore_index, mesh dims
    if c.fn.endswith(LP):
        k = 3 if c.opts.get("return_entropy") else 2
        return [("all_gather", "", 8 * (7 + int(c.fn == LP) + lin)), ("all_reduce", "max", 4 * r),
                ("all_reduce", "sum", 4 * r * k)]  # logits form: + ignore_index in the agreement
    ce = c.labels and c.opts.get("ce_weight", 0) > 0
    jsd = c.opts.get("divergence") == "jsd"
    return [("all_gather", "", 8 * (13 + lin)), ("all_reduce", "max", 4 * r * (3 if ce else 2)),
            ("all_reduce", "sum", 4 * r * (4 if ce else 2)), ("all_reduce", "sum", 8 * r * (3 if jsd else 1))]


# Peak memory per rank (world 2, the Triton path under the interpreter): N tokens, C_local classes per
# shard, fp32. Budget: the gradient(s) + the chunk buffers of the linear forms + PER_ROW bytes per token
# (O(N): per-row statistics, the O(N) collectives' buffers), and for jsd the temporaries of one row
# block of its terms (the worker sets TERMS_BLOCK = 16 logits: one row per block here).
MEM_N, MEM_C, MEM_D, MEM_CHUNK = 16, 512, 16, 4
PER_ROW = 1024
MEM_CASES = [
    ("mem-kl-ce", "distill", dict(divergence="kl", ce_weight=0.3, temperature=2.0)),
    ("mem-jsd", "distill", dict(divergence="jsd")),
    ("mem-llp-ent", "linear_logprobs", dict(return_entropy=True, chunk_size=MEM_CHUNK)),
    ("mem-ljsd-ce", "linear_distill", dict(divergence="jsd", ce_weight=0.2, chunk_size=MEM_CHUNK)),
]


def mem_budget(fn: str, opts: dict) -> int:
    N, C, D = MEM_N, MEM_C, MEM_D
    if fn.startswith("linear"):  # per model one (chunk, C) buffer (twice live at most: forward and
        # backward), fp32 dW, dX, db (the accumulators are the gradients; dX's all-reduced copy is O(N))
        models = 2 if fn == "linear_distill" else 1
        return 2 * models * MEM_CHUNK * C * 4 + (C * D + N * D + C) * 4 + PER_ROW * N
    block = 16 * C * 8 if opts.get("divergence") == "jsd" else 0  # one row of the jsd terms' temporaries
    return N * C * 4 + block + PER_ROW * N


def _spawn(world: int, tmp: pathlib.Path) -> tuple[dict, dict]:
    built = {c.id: _build(c, i) for i, c in enumerate(CASES) if c.world == world}
    specs = [dict(id=c.id, groups=[list(range(world))], sizes=c.sizes, fn=c.fn, opts=c.opts,
                  rank_opts=c.rank_opts, teacher_trim=c.teacher_trim, torch_path=c.torch_path,
                  dtensor=c.dtensor, module=c.module, data=built[c.id], mesh=c.mesh, h_pl=c.h_pl,
                  w_pl=c.w_pl)
             for c in CASES if c.world == world]
    if world == 2:
        specs += [dict(id=i, groups=[[0, 1]], fn=fn, opts=o, N=MEM_N, C_local=MEM_C, D=MEM_D)
                  for i, fn, o in MEM_CASES]
    return run_group(WORKER, world, specs, tmp, SPAWN_TIMEOUT_S), built


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return cached_spawner(_spawn, tmp_path_factory, "klvp")


@pytest.mark.parametrize("case", OK_CASES, ids=lambda c: c.id)
def test_matches_full_vocabulary(case: KC, results):
    """Every rank the same outputs; outputs and the concatenated gradients vs float64 truth."""
    res_all, data = results(case.world)
    res, d = res_all[case.id], data[case.id]
    assert_ranks_ok(res)
    for o in res[1:]:
        for a, b in zip(o["outs"], res[0]["outs"]):
            assert torch.equal(a, b), "ranks disagree"
    if case.dtensor:  # DTensor results, replicated over the TP mesh dim
        assert all(p == "(Replicate(),)" for p in res[0]["placements"]), res[0]["placements"]
        assert all(o.get("teacher_grad", None) is None for o in res), "the teacher is a constant"
    ref, ref_grads = run_composed(d, case, F64)
    own, own_grads = run_composed(d, case, case.dtype)
    for i, (a, t, r) in enumerate(zip(res[0]["outs"], own, ref)):
        assert a.dtype == F32 and a.shape == r.shape
        assert_close_rule(f"output {i}", a, t, r, case.dtype)
    if case.fn.startswith("linear"):  # dX summed over the group: the full dX on every rank
        for o in res[1:]:
            assert torch.equal(o["grad"], res[0]["grad"]), "ranks disagree on dX"
        grads = [res[0]["grad"], torch.cat([o["dw"] for o in res]), torch.cat([o["db"] for o in res])]
    else:
        grads = [torch.cat([o["grad"] for o in res], dim=-1)]
    for name, g, t, r in zip(("dX", "dW", "db"), grads, own_grads, ref_grads):
        assert g.dtype == case.dtype
        assert_close_rule(name, g, t, r, case.dtype)


@pytest.mark.parametrize("case", OK_CASES, ids=lambda c: c.id)
def test_collectives_per_call(case: KC, results):
    """Forward: the layout all_gather + O(r) all-reduces (never C-sized); backward: none but dX's (linear)."""
    (res_all, data), lin = results(case.world), case.fn.startswith("linear")
    r = int((data[case.id]["ids"] != -100).sum()) if lin and data[case.id]["ids"] is not None else R  # kept
    assert_ranks_ok(res_all[case.id])
    for o in res_all[case.id]:
        assert o["fwd"] == expected_calls(case, r)
        assert o["bwd"] == ([("all_reduce", "sum", 4 * r * D)] if lin else [])


@pytest.mark.parametrize("case", MESH_CASES, ids=lambda c: c.id)
def test_dtensor_linear_meshes(case: KC, results):
    """Token-sharded mesh dims (with or without a TP dim), logits and linear forms: every rank's
    full outputs and full gradients (``full_tensor``; a head's summed over the token-sharded dims)
    vs float64 truth."""
    res_all, data = results(case.world)
    res, d = res_all[case.id], data[case.id]
    assert_ranks_ok(res)
    ref, ref_grads = run_composed(d, case, F64)
    own, own_grads = run_composed(d, case, case.dtype)
    for r, o in enumerate(res):
        for i, (a, t, ref_i) in enumerate(zip(o["outs"], own, ref)):
            assert_close_rule(f"rank {r} output {i}", a, t, ref_i, case.dtype)
        for name, g, t, ref_g in zip(("dX", "dW", "db"), o["grads"], own_grads, ref_grads):
            assert_close_rule(f"rank {r} {name}", g, t, ref_g, case.dtype)
        assert o["teacher_grad"] is None, "the teacher is a constant"


@pytest.mark.parametrize("case", [c for c in CASES if c.error], ids=lambda c: c.id)
def test_mismatch_raises_on_every_rank(case: KC, results):
    res = results(case.world)[0][case.id]
    for r, o in enumerate(res):
        assert o.get("error") == "ValueError", f"rank {r}: {o}"


@pytest.mark.parametrize("cid, fn, opts", MEM_CASES, ids=[m[0] for m in MEM_CASES])
def test_peak_memory_per_rank(cid: str, fn: str, opts: dict, results, record_property):
    """Peak extra bytes of forward + backward on each rank <= ``mem_budget``: no N x C_local
    temporaries beyond the gradient (logits) or one chunk per model (linear forms)."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("peak_extra_bytes measures CPU allocations of the interpreted kernels")
    res = results(2)[0][cid]
    assert_ranks_ok(res)
    budget = mem_budget(fn, opts)
    for r, o in enumerate(res):
        peak = o["peak"]
        record_property(f"peak_rank{r}", peak)
        print(f"\n{cid} rank {r}: peak {peak} B = {peak / (MEM_N * MEM_C):.3f} B per token per local class "
              f"(budget {budget / (MEM_N * MEM_C):.3f})")
        assert peak <= budget, f"rank {r}: peak {peak} B > budget {budget} B"
