"""Ignored tokens cost no FLOPs in the class-sharded linear forms (``process_group=``, world 2, gloo on
CPU; issue 20): each rank's GEMM FLOPs are exactly its kept tokens' share (tests/harness/
kl_compaction_cases.py, C = the rank's shard), so <= 1.02 (1 - f) x the f = 0 base; results within
the tolerance rule of the uncompacted run (XENT_COMPACT=0); and a rank whose mask differs (another
ignored count, or compaction off on that rank alone) raises ValueError on EVERY rank: the kept count
is in the layout exchange's agreement, so no rank waits in a collective of another size (the group
runs under a deadline). One spawn of two processes runs every case (tests/harness/kl_compaction_worker.py).
"""
from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F

from kl_compaction_cases import flops_per_token, heads, ignored_ids, ref_distill_rows, ref_logprobs
from spawn_group import assert_ranks_ok, cached_spawner, run_group
from tolerances import assert_close_rule

WORKER = pathlib.Path(__file__).resolve().parents[1] / "harness" / "kl_compaction_worker.py"
SPAWN_TIMEOUT_S = 120
F32, F64 = torch.float32, torch.float64
N, D, DT, SIZES = 20, 16, 12, [24, 40]
C = sum(SIZES)
KW = {"logprobs": dict(temperature=0.8, ignore_index=5, chunk_size=6),
      "distill": dict(divergence="kl", ce_weight=0.3, temperature=1.3, chunk_size=6)}
IGN = {"logprobs": 5, "distill": -100}
FRACS = (0.0, 0.5, 0.9)


def case_id(fn: str, frac: float, path: str = "triton", compact: str = "1") -> str:
    return f"{fn}-f{frac}-{path}" + ("-uncompacted" if compact == "0" else "")


def specs() -> list:
    """Every case: (fn, f, path, compaction) runs, and the two mismatches (``rank_ids`` /
    ``rank_compact``: rank 1's own tokens / XENT_COMPACT)."""
    out = []
    for i, fn in enumerate(("logprobs", "distill")):
        t = heads(N, D, DT, C, F32, seed=40 + i)
        gen = torch.Generator().manual_seed(50 + i)
        ups = [torch.randn(N, generator=gen) for _ in range(2 if fn == "logprobs" else 1)]
        runs = [(f, "triton", "1") for f in FRACS] + [(0.5, "torch", "1"), (0.5, "triton", "0"),
                                                      (0.5, "torch", "0")]
        for frac, path, compact in runs:
            ids = ignored_ids(N, C, frac, IGN[fn], seed=60 + i)
            out.append(dict(id=case_id(fn, frac, path, compact), groups=[[0, 1]], fn=fn, sizes=SIZES,
                            kw=KW[fn], torch_path=path == "torch", compact=compact, rank_ids={},
                            rank_compact={}, data=dict(t, ids=ids, ups=ups)))
        mism = dict(out[-1], id=f"{fn}-mismatch-ids", torch_path=False, compact="1")
        other = mism["data"]["ids"].clone()
        other[(other != IGN[fn]).nonzero()[0, 0]] = IGN[fn]  # one more ignored token on rank 1
        out += [dict(mism, rank_ids={1: other}),
                dict(mism, id=f"{fn}-mismatch-compaction-off", rank_compact={1: "0"})]
    return out


def _spawn(world: int, tmp: pathlib.Path) -> tuple[dict, dict]:
    cases = specs()
    return run_group(WORKER, world, cases, tmp, SPAWN_TIMEOUT_S), {c["id"]: c for c in cases}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return cached_spawner(_spawn, tmp_path_factory, "klcompact")


@pytest.mark.parametrize("fn", ["logprobs", "distill"])
@pytest.mark.parametrize("frac,path", [(f, "triton") for f in FRACS] + [(0.5, "torch")])
def test_flops_per_rank_scale_with_kept_tokens(fn, frac, path, results, record_property):
    """Per rank: FLOPs == flops_per_token(C_local) x kept tokens, <= 1.02 (1 - f) x the f = 0 base."""
    res_all, cases = results(2)
    res, case = res_all[case_id(fn, frac, path)], cases[case_id(fn, frac, path)]
    assert_ranks_ok(res)
    kept = int((case["data"]["ids"] != IGN[fn]).sum())
    for r, o in enumerate(res):
        per = flops_per_token(fn, D, DT, SIZES[r])
        ratio = o["flops"] / (per * N)
        record_property(f"flop_ratio_rank{r}", ratio)
        print(f"\n{fn} {path} f={frac} rank {r}: flops {o['flops']} = {ratio:.4f} x base")
        assert o["flops"] == per * kept
        assert ratio <= 1.02 * (1 - frac)


def reference(case: dict, dtype: torch.dtype) -> list:
    """The single-device torch composition on the full head: outputs, dX, dW, db."""
    d, kw, fn = case["data"], case["kw"], case["fn"]
    leaves = [d[k].to(dtype).clone().requires_grad_() for k in ("h", "w", "b")]
    z = F.linear(*leaves)
    if fn == "logprobs":
        outs = list(ref_logprobs(z, d["ids"], kw["temperature"], kw["ignore_index"]))
    else:
        zt = F.linear(d["ht"].to(dtype), d["wt"].to(dtype), d["bt"].to(dtype))
        outs = [ref_distill_rows(z, zt, d["ids"], "kl", 0.5, kw["temperature"], kw["ce_weight"], -100)]
    torch.autograd.backward(outs, [u.to(dtype) for u in d["ups"]])
    return [o.detach() for o in outs] + [leaf.grad for leaf in leaves]


def gathered(res: list) -> list:
    """Rank 0's outputs and dX, the head's gradients concatenated over the shards."""
    return res[0]["outs"] + [res[0]["grads"][0]] + [torch.cat([o["grads"][i] for o in res]) for i in (1, 2)]


@pytest.mark.parametrize("fn", ["logprobs", "distill"])
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_compacted_equals_uncompacted(fn, path, results):
    """f = 0.5: every rank the same outputs; outputs and gradients within the rule of float64 truth
    with the uncompacted run (XENT_COMPACT=0) as the dtype's own error; ignored rows exactly 0."""
    res_all, cases = results(2)
    ours, theirs = (res_all[case_id(fn, 0.5, path, c)] for c in ("1", "0"))
    assert_ranks_ok(ours)
    assert_ranks_ok(theirs)
    for a, b in zip(ours[0]["outs"], ours[1]["outs"]):
        assert torch.equal(a, b), "ranks disagree"
    case = cases[case_id(fn, 0.5, path)]
    names = ("logprob", "entropy") if fn == "logprobs" else ("loss",)
    for name, a, th, r in zip(names + ("dX", "dW", "db"), gathered(ours), gathered(theirs),
                              reference(case, F64)):
        assert_close_rule(name, a, th, r, F32)
    ign = case["data"]["ids"] == IGN[fn]
    assert all((o[ign] == 0).all() for o in ours[0]["outs"] + [ours[0]["grads"][0]])


@pytest.mark.parametrize("fn", ["logprobs", "distill"])
@pytest.mark.parametrize("what", ["ids", "compaction-off"])
def test_mask_mismatch_raises_on_every_rank(fn, what, results):
    """Rank 1 ignores one more token (or runs with XENT_COMPACT=0): ValueError on both ranks, naming
    the kept count, and no rank hangs (the spawn's deadline)."""
    res = results(2)[0][f"{fn}-mismatch-{what}"]
    for r, o in enumerate(res):
        assert o.get("error") == "ValueError", f"rank {r}: {o}"
        assert "kept_tokens" in o["message"]
