"""``ignore_index`` of ``token_logprobs`` (and ``linear_token_logprobs``) under vocabulary parallelism:
``process_group=`` and DTensor ``Shard(-1)`` logits, world 2 (gloo on CPU), both CPU paths, in ONE
spawned group (the worker of tests/kl/test_kl_vocab_parallel.py, tests/harness/kl_vocab_parallel_worker.py).

Per case: every rank returns bitwise the same values; ignored positions return exactly 0 and their
rows get an exactly zero gradient on every shard; the rest follows the tolerance rule against the
masked float64 composition on the full vocabulary, and is bitwise the run in which those positions
hold valid tokens with a zero upstream gradient; the forward's collectives are the same O(R) ones
(ignore_index joins the layout agreement: one more float64 per rank); a rank passing another
ignore_index raises ValueError on every rank (no hang: the group runs under a deadline). A custom
ignore id of 7 is a valid class owned by one shard.
"""
from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch
import torch.nn.functional as F

from spawn_group import assert_ranks_ok, cached_spawner, run_group
from tolerances import assert_close_rule

WORKER = pathlib.Path(__file__).resolve().parents[1] / "harness" / "kl_vocab_parallel_worker.py"
SPAWN_TIMEOUT_S = 120
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
ROWS, R, D = (2, 3), 6, 5
TW = torch.rand(ROWS, generator=torch.Generator().manual_seed(7)) + 0.25


@dataclasses.dataclass
class PC:
    id: str
    sizes: list  # classes per rank (DTensor: the torch.chunk layout)
    opts: dict
    frac: float = 0.5  # fraction of the positions ignored
    fn: str = "logprobs"  # or "linear_logprobs"
    dtype: torch.dtype = F32
    torch_path: bool = False
    dtensor: bool = False
    module: bool = False
    rank_opts: dict = dataclasses.field(default_factory=dict)
    error: bool = False

    @property
    def ign(self) -> int:
        return self.opts.get("ignore_index", -100)


CASES = [
    PC("lp-uneven-ent", [4, 9], dict(temperature=0.7, return_entropy=True)),
    PC("lp-ign7-torch-cap-tw-ent", [5, 8], dict(ignore_index=7, softcap=4.0, token_weight=TW,
                                                 return_entropy=True), torch_path=True),  # 7: on rank 1
    PC("lp-ign7-bf16-T1.3", [9, 4], dict(ignore_index=7, temperature=1.3), dtype=BF16),  # on rank 0
    PC("lp-empty-shard-all-ignored", [0, 13], dict(return_entropy=True), frac=1.0),
    PC("lp-none-ignored-ign7", [6, 7], dict(ignore_index=7, return_entropy=True), frac=0.0),
    PC("dt-lp-ign7-ent", [7, 6], dict(ignore_index=7, return_entropy=True, temperature=0.8), dtensor=True),
    PC("dt-lp-torch", [7, 6], dict(softcap=3.0), torch_path=True, dtensor=True),
    PC("mod-lp-ign7-ent", [5, 8], dict(ignore_index=7, return_entropy=True), module=True),
    PC("llp-ign7-ent-chunk4", [4, 9], dict(ignore_index=7, return_entropy=True, chunk_size=4),
       fn="linear_logprobs"),
    PC("dt-llp-torch", [7, 6], dict(temperature=0.7), fn="linear_logprobs", torch_path=True, dtensor=True),
    PC("err-lp-ign-differs", [4, 9], dict(), rank_opts={1: dict(ignore_index=7)}, error=True),
    PC("err-dt-lp-ign-differs", [7, 6], dict(ignore_index=3), rank_opts={0: dict(ignore_index=4)}, error=True,
       dtensor=True),
]


def _build(c: PC, seed: int, full: bool) -> dict:
    """Inputs of a case; ``full``: the ignored positions hold valid tokens and a zero upstream."""
    gen = torch.Generator().manual_seed(500 + seed)
    C = sum(c.sizes)
    ids = torch.randint(0, C - 1, ROWS, generator=gen)
    ids = torch.where(ids >= c.ign, ids + 1, ids) if 0 <= c.ign < C else ids  # never the ignore id
    drop = torch.randperm(R, generator=gen)[:round(c.frac * R)]
    keep = torch.ones(R, dtype=torch.bool)
    keep[drop] = False
    keep = keep.view(ROWS)
    n_ups = 2 if c.opts.get("return_entropy") else 1
    d = dict(x=(3 * torch.randn(*ROWS, C, generator=gen)).to(c.dtype), t=torch.randn(*ROWS, C, generator=gen),
             ids=ids if full else torch.where(keep, ids, c.ign), keep=keep,
             ups=[torch.randn(ROWS, generator=gen) * (keep if full else 1) for _ in range(n_ups)])
    if c.fn.startswith("linear"):
        d.update(h=torch.randn(*ROWS, D, generator=gen).to(c.dtype),
                 w=(torch.randn(C, D, generator=gen) / 2).to(c.dtype),
                 b=torch.randn(C, generator=gen).to(c.dtype),
                 ht=torch.randn(*ROWS, 4, generator=gen), wt=torch.randn(C, 4, generator=gen),
                 bt=torch.randn(C, generator=gen))
    return d


def _spec(c: PC, cid: str, data: dict) -> dict:
    return dict(id=cid, groups=[[0, 1]], sizes=c.sizes, fn=c.fn, opts=c.opts, rank_opts=c.rank_opts,
                teacher_trim={}, torch_path=c.torch_path, dtensor=c.dtensor, module=c.module,
                data={k: v for k, v in data.items() if k != "keep"}, mesh=(), h_pl=(), w_pl=())


def _spawn(world: int, tmp: pathlib.Path) -> tuple[dict, dict]:
    run = CASES
    built = {c.id: _build(c, i, False) for i, c in enumerate(run)}
    twins = {c.id: _build(c, i, True) for i, c in enumerate(run) if not c.error}
    specs = [_spec(c, c.id, built[c.id]) for c in run]
    specs += [_spec(c, c.id + "/full", twins[c.id]) for c in run if not c.error]
    return run_group(WORKER, world, specs, tmp, SPAWN_TIMEOUT_S), dict(built=built, twins=twins)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return cached_spawner(_spawn, tmp_path_factory, "lpign")


def composed(leaves: list, d: dict, c: PC) -> list:
    """Masked torch composition on the full vocabulary (logits, or hidden states and the head)."""
    z = F.linear(*leaves) if c.fn.startswith("linear") else leaves[0]
    cap, T, tw = c.opts.get("softcap"), c.opts.get("temperature", 1.0), c.opts.get("token_weight")
    keep = d["keep"]
    z = cap * torch.tanh(z / cap) if cap else z
    logq = F.log_softmax(z / T, -1)
    outs = [logq.gather(-1, torch.where(keep, d["ids"], 0)[..., None])[..., 0]]
    if c.opts.get("return_entropy"):
        outs.append(-(logq.exp() * logq).sum(-1))
    outs = [torch.where(keep, o, torch.zeros((), dtype=o.dtype)) for o in outs]
    return outs if tw is None else [o * tw.to(o.dtype) for o in outs]


def run_composed(d: dict, c: PC, dtype: torch.dtype) -> tuple[list, list]:
    keys = ("h", "w", "b") if c.fn.startswith("linear") else ("x",)
    leaves = [d[k].detach().to(dtype).requires_grad_() for k in keys]
    outs = composed(leaves, d, c)
    torch.autograd.backward(outs, [u.to(o.dtype) for o, u in zip(outs, d["ups"])])
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves]


def grads_of(res: list, c: PC) -> list:
    """The full gradients from the ranks' parts (shards concatenated; dX summed over the group)."""
    if c.fn.startswith("linear"):
        return [res[0]["grad"], torch.cat([o["dw"] for o in res]), torch.cat([o["db"] for o in res])]
    return [torch.cat([o["grad"] for o in res], dim=-1)]


OK = [c for c in CASES if not c.error]


@pytest.mark.parametrize("case", OK, ids=lambda c: c.id)
def test_ignored_positions_under_vocab_parallel(case: PC, results):
    res_all, data = results(2)
    res, twin, d = res_all[case.id], res_all[case.id + "/full"], data["built"][case.id]
    assert_ranks_ok(res)
    assert_ranks_ok(twin)
    keep = d["keep"]
    for o in res[1:]:
        assert all(torch.equal(a, b) for a, b in zip(o["outs"], res[0]["outs"])), "ranks disagree"
    for o in res[0]["outs"]:
        assert (o[~keep] == 0).all(), "an ignored position's output is not 0"
    for r, o in enumerate(res):  # this rank's shard of the logits (or dX): zero rows where ignored
        assert (o["grad"][~keep] == 0).all(), f"rank {r}: an ignored row got a gradient"
    for a, b in zip(res[0]["outs"], twin[0]["outs"]):  # the valid rows: bitwise the run without ignoring
        assert torch.equal(a[keep], b[keep]), "a valid row changed"
    grads, twin_grads = grads_of(res, case), grads_of(twin, case)
    if not case.fn.startswith("linear"):  # (the linear form's dW / db sum over rows: tolerance below)
        assert torch.equal(grads[0], twin_grads[0]), "the gradient differs from the run without ignoring"
    ref, ref_grads = run_composed(d, case, F64)
    own, own_grads = run_composed(d, case, case.dtype)
    for i, (a, t, r) in enumerate(zip(res[0]["outs"], own, ref)):
        assert_close_rule(f"output {i}", a, t, r, case.dtype)
    for name, g, t, r in zip(("dX", "dW", "db"), grads, own_grads, ref_grads):
        assert_close_rule(name, g, t, r, case.dtype)


@pytest.mark.parametrize("case", [c for c in OK if not c.dtensor and c.fn == "logprobs"], ids=lambda c: c.id)
def test_collectives_unchanged_by_ignoring(case: PC, results):
    """The forward's collectives: the layout all_gather (8 float64 per rank: ignore_index included)
    and the O(R) all-reduces of every row (each rank skips the same rows: nothing to agree on beyond
    the options); none in backward."""
    res = results(2)[0][case.id]
    k = 3 if case.opts.get("return_entropy") else 2
    for o in res:
        assert o["fwd"] == [("all_gather", "", 8 * 8), ("all_reduce", "max", 4 * R),
                            ("all_reduce", "sum", 4 * R * k)]
        assert o["bwd"] == []


@pytest.mark.parametrize("case", [c for c in CASES if c.error], ids=lambda c: c.id)
def test_different_ignore_index_raises_on_every_rank(case: PC, results):
    res = results(2)[0][case.id]
    for r, o in enumerate(res):
        assert o.get("error") == "ValueError" and "ignore_index" in o["message"], f"rank {r}: {o}"
