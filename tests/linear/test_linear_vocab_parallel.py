"""Vocabulary-parallel fused linear cross-entropy (``parallel.linear``) against the full-vocabulary truth.

Each world size (2 and 4 ranks, gloo on CPU, the Triton interpreter) is ONE group of spawned
processes (tests/harness/linear_vocab_parallel_worker.py) running every case of the table for that size.
Per case: every rank returns bitwise the same loss (and lse); loss, lse, the concatenated weight /
bias shard gradients and the input gradient follow the tolerance rule against float64
F.linear + ``cross_entropy_composed`` on the full classifier (reduced: every rank holds bitwise the
same, full input gradient; unreduced: the ranks' partials sum to it); the collectives per call are
exactly all_reduce(MAX, N) + all_reduce(SUM, k N) forward and all_reduce(SUM, N D fp32) backward
(none when unreduced or when the input needs no gradient); a bad setup raises on every rank.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from cases import BF16, F16, F32, F64, assert_rule
from reference import cross_entropy_composed
from spawn_group import assert_ranks_ok, cached_spawner, run_group
from xent_triton.core.options import LossOptions

WORKER = pathlib.Path(__file__).resolve().parents[1] / "harness" / "linear_vocab_parallel_worker.py"
SPAWN_TIMEOUT_S = 240
# the per-call layout / agreement all_gather: at most this many float64 per rank (layout 3, weight
# length 1, one per LossOptions field, 8 of the head's own, 1 refused flag)
LAYOUT_FLOATS = 13 + len(dataclasses.fields(LossOptions))


@dataclasses.dataclass
class LVP:
    """One case: C classes of a (C, D) classifier split in ``sizes`` over each TP group."""
    id: str
    world: int
    sizes: list
    dtype: torch.dtype = F32
    N: int = 24
    D: int = 32
    bias: bool = True
    opts: dict = dataclasses.field(default_factory=dict)
    weight: bool = False
    use_lse: bool = False  # the returned lse enters the objective with a random upstream gradient
    need: tuple = (True, True, True)  # requires_grad of input, weight shard, bias shard
    starts: Optional[list] = None  # explicit vocab_start_index per group rank
    groups: Optional[list] = None
    torch_path: bool = False  # TRITON_INTERPRET=0 in the worker: the pure-torch path
    tiles: Optional[dict] = None  # config.overrides(...) in the worker: class tiles and splits
    ignore_block: bool = False  # rows 0..15 ignored (a whole skipped row block with 16-row tiles)
    compile: bool = False
    layout: str = "plain"  # | "strided" (x a column slice, y a strided 1-D view) | "3d" ((2, N/2, D))
    repeat: int = 1
    bad_target: Optional[int] = None
    weight_len: Optional[int] = None
    error: Optional[tuple] = None  # (exception name, message fragment) every rank must raise
    flops: bool = False  # count each rank's FLOPs; ``ignore_frac`` is then exact (random positions)

    @property
    def C(self) -> int:
        return sum(self.sizes)

    @property
    def real_starts(self) -> list:
        given = self.starts or [None] * len(self.sizes)
        return [s if s is not None else sum(self.sizes[:i]) for i, s in enumerate(given)]

    @property
    def reduced(self) -> bool:
        return self.opts.get("reduce_input_grad", True)


IGN = dict(ignore_index=-100, ignore_frac=0.25)
ALL = dict(IGN, label_smoothing=0.1, lse_square_scale=1e-3, softcap=4.0, logit_scale=1.3)
NOT_REDUCED = dict(reduce_input_grad=False)
CASES = [
    # bad setups first: the group must stay usable after them
    LVP("w2-bad-overlapping-starts", 2, [16, 16], starts=[0, 8], error=("ValueError", "do not tile")),
    LVP("w2-bad-target-beyond-C", 2, [16, 16], bad_target=32, error=("IndexError", "out of bounds")),
    LVP("w2-bad-weight-is-the-shard", 2, [16, 16], weight=True, weight_len=16,
        error=("ValueError", "weight")),
    LVP("w4-bad-starts-gap", 4, [8, 8, 8, 8], starts=[0, 8, 16, 25], error=("ValueError", "do not tile")),
    # world 2
    LVP("w2-C64-fp32-equal-mean-ignore-strided", 2, [32, 32], layout="strided", opts=dict(IGN)),
    LVP("w2-C37-bf16-unequal-sum-smooth-weight", 2, [17, 20], BF16, weight=True,
        opts=dict(IGN, reduction="sum", label_smoothing=0.1)),
    LVP("w2-C48-fp32-zloss-softcap-scale-none-lse-3d", 2, [24, 24], use_lse=True, layout="3d",
        opts=dict(IGN, reduction="none", lse_square_scale=1e-2, softcap=5.0, logit_scale=1.7)),
    LVP("w2-C500-fp16-tiles128-splits-skipblock-unreduced", 2, [260, 240], F16, N=48, D=40, weight=True,
        tiles=dict(linear_block_v=128, linear_splits=2), ignore_block=True,
        opts=dict(IGN, label_smoothing=0.1, **NOT_REDUCED)),
    LVP("w2-C30-fp32-explicit-starts-swapped-smooth-weight-nobias", 2, [14, 16], starts=[16, 0], bias=False,
        weight=True, opts=dict(IGN, label_smoothing=0.05)),
    LVP("w2-C64-fp64-torchpath-all-lse", 2, [30, 34], F64, weight=True, use_lse=True, torch_path=True,
        opts=dict(ALL)),
    LVP("w2-C40-bf16-weight-grads-only-repeat", 2, [20, 20], BF16, need=(False, True, True), repeat=2,
        opts=dict(IGN, label_smoothing=0.1)),
    LVP("w2-C32-fp32-compiled-smooth", 2, [16, 16], compile=True, opts=dict(IGN, label_smoothing=0.1)),
    # ignored tokens cost no FLOPs on any rank (each rank compacts alike: the targets are the same)
    LVP("w2-C64-fp32-torchpath-flops-none-ignored", 2, [32, 32], N=40, torch_path=True, flops=True),
    LVP("w2-C64-fp32-torchpath-flops-half-ignored", 2, [32, 32], N=40, torch_path=True, flops=True,
        opts=dict(IGN, ignore_frac=0.5, label_smoothing=0.1)),
    LVP("w2-C66-fp32-torchpath-flops-90pc-ignored", 2, [30, 36], N=40, torch_path=True, flops=True,
        opts=dict(IGN, ignore_frac=0.9)),
    LVP("w2-C256-bf16-flops-half-ignored", 2, [128, 128], BF16, N=128, D=64, flops=True,  # whole tiles
        opts=dict(IGN, ignore_frac=0.5)),
    # world 4
    LVP("w4-C1000-bf16-unequal-all-weight-mean-lse", 4, [251, 250, 250, 249], BF16, N=64, D=64,
        weight=True, use_lse=True, opts=dict(ALL)),
    LVP("w4-C37-fp32-unequal-none-lse-zloss-softcap-unreduced", 4, [10, 9, 9, 9], use_lse=True,
        opts=dict(IGN, reduction="none", lse_square_scale=1e-2, softcap=3.0, **NOT_REDUCED)),
    LVP("w4-C40-fp16-sum-smooth-weight-nobias", 4, [10, 10, 10, 10], F16, bias=False, weight=True,
        opts=dict(IGN, reduction="sum", label_smoothing=0.2)),
    LVP("w4-tp2x2-C40-bf16-subgroups-smooth", 4, [20, 20], BF16, groups=[[0, 1], [2, 3]],
        opts=dict(IGN, label_smoothing=0.1)),
]
OK_CASES = [pytest.param(c, id=c.id) for c in CASES if c.error is None]
ERR_CASES = [pytest.param(c, id=c.id) for c in CASES if c.error is not None]


def _targets(c: LVP, gen: torch.Generator) -> torch.Tensor:
    """Row i's class lies in shard i % P (every rank owns targets); some rows ignored."""
    y = torch.empty(c.N, dtype=torch.int64)
    for i in range(c.N):
        k = i % len(c.sizes)
        y[i] = c.real_starts[k] + int(torch.randint(0, c.sizes[k], (1,), generator=gen))
    if c.flops:  # exactly round(f N) ignored rows, at random positions
        drop = torch.zeros(c.N, dtype=torch.bool)
        drop[torch.randperm(c.N, generator=gen)[:round(c.opts.get("ignore_frac", 0) * c.N)]] = True
        y[drop] = c.opts.get("ignore_index", -100)
    elif c.opts.get("ignore_frac"):
        drop = torch.rand(c.N, generator=gen) < c.opts["ignore_frac"]
        drop[-1], drop[1] = True, False
        if c.ignore_block:
            drop[:16] = True
        y[drop] = c.opts["ignore_index"]
    if c.bad_target is not None:
        y[0] = c.bad_target
    return y


def _build(c: LVP, seed: int) -> tuple[dict, list]:
    """The worker's case dict and the full inputs of each TP group."""
    gen = torch.Generator().manual_seed(seed)
    groups = c.groups or [list(range(c.world))]
    data = []
    for _ in groups:
        x = torch.randn(c.N, c.D, generator=gen).to(c.dtype)
        W = (torch.randn(c.C, c.D, generator=gen) * (3.0 / math.sqrt(c.D))).to(c.dtype)
        b = (torch.randn(c.C, generator=gen) * 0.5).to(c.dtype) if c.bias else None
        w = ((torch.rand(c.weight_len or c.C, generator=gen) * 1.5 + 0.25).to(c.dtype).float()
             if c.weight else None)
        low = c.dtype if c.dtype != F64 else F32
        none = c.opts.get("reduction") == "none"
        g = torch.randn(c.N, generator=gen).to(low).float() if none else torch.tensor(0.37).to(low).float()
        h = torch.randn(c.N, generator=gen).to(low).float() if c.use_lse else None
        data.append(dict(x=x, W=W, b=b, weight=w, target=_targets(c, gen), g=g, h=h))
    opts = {k: v for k, v in c.opts.items() if k != "ignore_frac"}
    if c.use_lse:
        opts["return_lse"] = True
    spec = dict(id=c.id, sizes=c.sizes, starts=c.starts, real_starts=c.real_starts, groups=groups,
                data=data, opts=opts, need=c.need, torch_path=c.torch_path, tiles=c.tiles,
                compile=c.compile, layout=c.layout, repeat=c.repeat, flops=c.flops)
    return spec, data


def _spawn(world: int, tmp: pathlib.Path) -> tuple[dict, dict]:
    """Run every case of ``world`` in one group of ``world`` processes:
    ({case id: [result of each rank]}, {case id: the full-vocabulary inputs of each TP group})."""
    built = {c.id: _build(c, seed=i) for i, c in enumerate(CASES) if c.world == world}
    results = run_group(WORKER, world, [spec for spec, _ in built.values()], tmp, SPAWN_TIMEOUT_S)
    return results, {cid: d for cid, (_, d) in built.items()}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return cached_spawner(_spawn, tmp_path_factory, "lvp")


_ok = assert_ranks_ok


def _composed(c: LVP, d: dict, dtype: torch.dtype) -> tuple:
    """F.linear + cross_entropy_composed on the full classifier in ``dtype``: (loss, lse, dx, dW, db)."""
    x, W = (d[k].detach().to(dtype).requires_grad_(n) for k, n in (("x", c.need[0]), ("W", True)))
    b = d["b"].detach().to(dtype).requires_grad_() if d["b"] is not None else None
    opts = {k: v for k, v in c.opts.items() if k not in ("ignore_frac", "reduce_input_grad")}
    cw = d["weight"].to(dtype) if d["weight"] is not None else None
    loss, lse = cross_entropy_composed(F.linear(x, W, b), d["target"], cw, return_lse=True, **opts)
    tensors, grads = [loss], [d["g"].to(dtype)]
    if c.use_lse:
        tensors.append(lse)
        grads.append(d["h"].to(dtype))
    torch.autograd.backward(tensors, grads)
    return loss.detach(), lse.detach(), x.grad, W.grad, None if b is None else b.grad


@pytest.mark.parametrize("case", OK_CASES)
def test_matches_full_vocabulary(case: LVP, results):
    """Every rank: the same loss/lse and input gradient (reduced); all vs float64 truth."""
    res, data = (table[case.id] for table in results(case.world))
    _ok(res)
    out_dtype = F64 if case.dtype == F64 else F32
    for gi, d in enumerate(data):
        ranks = sorted((o for o in res if o["group_index"] == gi), key=lambda o: o["group_rank"])
        first = ranks[0]
        assert first["loss"].dtype == out_dtype
        for o in ranks[1:]:  # bit for bit on every rank
            assert torch.equal(o["loss"], first["loss"]), "ranks disagree on the loss"
            if case.use_lse:
                assert torch.equal(o["lse"], first["lse"]), "ranks disagree on the lse"
        ref, theirs = _composed(case, d, F64), _composed(case, d, case.dtype)
        assert_rule("loss", first["loss"], theirs[0], ref[0], out_dtype)
        if case.use_lse:
            assert_rule("lse", first["lse"], theirs[1], ref[1], out_dtype)
        order = sorted(ranks, key=lambda o: case.real_starts[o["group_rank"]])
        dw = torch.cat([o["dw"] for o in order])
        assert dw.dtype == case.dtype and dw.shape == (case.C, case.D)
        assert_rule("d_weight", dw, theirs[3], ref[3], case.dtype)
        if case.bias and case.need[2]:
            assert_rule("d_bias", torch.cat([o["db"] for o in order]), theirs[4], ref[4], case.dtype)
        if not case.need[0]:
            assert all(o["dx"] is None for o in ranks)
            continue
        assert all(o["dx"].dtype == case.dtype for o in ranks)
        if case.reduced:  # every rank holds the same, full input gradient
            for o in ranks[1:]:
                assert torch.equal(o["dx"], first["dx"]), "ranks disagree on the reduced input gradient"
            dx = first["dx"]
        else:  # partials: none is the full gradient, their sum is
            dx = torch.stack([o["dx"].double() for o in ranks]).sum(0)
            assert not torch.allclose(first["dx"].double(), ref[2], rtol=0.05, atol=0.0), \
                "reduce_input_grad=False must leave the input gradient unreduced"
        assert_rule("d_input", dx, theirs[2], ref[2], case.dtype)
        ignored = d["target"] == case.opts.get("ignore_index", -100)
        assert bool(ignored.any()) == bool(case.opts.get("ignore_frac")), "table: ignored rows as intended"
        if not case.use_lse:  # ignored rows: exactly zero input gradient on every rank
            assert all(torch.all(o["dx"][ignored] == 0) for o in ranks)


@pytest.mark.parametrize("case", OK_CASES)
def test_collectives_per_call(case: LVP, results):
    """Forward: the layout / agreement all_gather (a few float64 per rank, EVERY call: no cache)
    + all_reduce MAX of N values + all_reduce SUM of k N (k = 2, 3 with smoothing); backward: one
    all_reduce SUM of the fp32 (fp64) N x D input gradient, or nothing (unreduced, or no input
    gradient)."""
    res = results(case.world)[0][case.id]
    _ok(res)
    item = 8 if case.dtype == F64 else 4
    k = 3 if case.opts.get("label_smoothing", 0) > 0 else 2
    bwd = [("all_reduce", "sum", case.N * case.D * item)] if case.reduced and case.need[0] else []
    for o in res:
        for call in o["calls"]:
            first, *rest = call["fwd"]
            assert first[0] == "all_gather" and 0 < first[2] <= 8 * LAYOUT_FLOATS, first
            assert rest == [("all_reduce", "max", case.N * item), ("all_reduce", "sum", k * case.N * item)]
            assert call["bwd"] == bwd


@pytest.mark.parametrize("case", ERR_CASES)
def test_bad_setup_raises_on_every_rank(case: LVP, results):
    res = results(case.world)[0][case.id]
    name, fragment = case.error
    for r, out in enumerate(res):
        assert out.get("error") == name, \
            f"rank {r}: expected {name}, got {out.get('error')}: {out.get('message')}"
        assert fragment in out["message"], out["message"]


FLOP_CASES = [pytest.param(c, id=c.id) for c in CASES if c.flops]


@pytest.mark.parametrize("case", FLOP_CASES)
def test_ignored_tokens_cost_no_flops_on_any_rank(case: LVP, results):
    """Forward + backward FLOPs of each rank (aten GEMMs + interpreted tl.dot) <= 1.02 x (1 - f) x
    8 N D C_local (the class-sharded head recomputes its logits in backward: the per-token path's
    base) with a fraction f of the tokens ignored: every rank compacts the same rows away."""
    res = results(case.world)[0][case.id]
    _ok(res)
    f = case.opts.get("ignore_frac", 0.0)
    for o in res:
        base = 8 * case.N * case.D * case.sizes[o["group_rank"]]
        print(f"{case.id} rank {o['group_rank']}: flops = {o['flops'] / base:.4f} x 8 N D C_local")
        assert 0 < o["flops"] <= 1.02 * (1 - f) * base


def test_process_group_is_required():
    """The vocab-parallel entry point refuses to run without a group (no silent local loss)."""
    from xent_triton.core.options import LossOptions
    from xent_triton.linear.parallel import vocab_parallel_linear_cross_entropy

    with pytest.raises(ValueError, match="process_group"):
        vocab_parallel_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,)),
                                            None, None, LossOptions(), return_lse=False, process_group=None)
