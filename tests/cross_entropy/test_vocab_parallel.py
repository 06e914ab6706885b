"""Vocabulary-parallel cross-entropy (``process_group=``) against the full-vocabulary truth.

Each world size (2 and 4 ranks, gloo on CPU, the Triton interpreter) is ONE group of spawned
processes (tests/harness/vocab_parallel_worker.py) that runs every case of the table for that size; the
tests below then check, per case: every rank returned bitwise the same loss (and lse); the loss,
lse and the concatenated shard gradients follow the tolerance rule against float64
``cross_entropy_composed`` on the full vocabulary; the collectives per call are exactly
all_reduce(MAX, R values) + all_reduce(SUM, k R values) in forward and none in backward; a bad
setup raises the same error on every rank (no hang).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional

import pytest
import torch

from cases import (
    BF16,
    F16,
    F32,
    F64,
    assert_rule,
    class_weight,
    logits,
    probabilities,
    run_composed,
    upstream,
)
from spawn_group import assert_ranks_ok, cached_spawner, run_group
from xent_triton.core.options import LossOptions

WORKER = pathlib.Path(__file__).resolve().parents[1] / "harness" / "vocab_parallel_worker.py"
SPAWN_TIMEOUT_S = 240
# the per-call layout / agreement all_gather: at most this many float64 per rank (layout 3, weight
# length 1, one per LossOptions field, return_lse / soft_target / token_weight / 2 refused flags)
LAYOUT_FLOATS = 9 + len(dataclasses.fields(LossOptions))


@dataclasses.dataclass
class VP:
    """One case: C classes split in ``sizes`` over each TP group of ``groups`` (default: all ranks)."""
    id: str
    world: int
    sizes: list
    dtype: torch.dtype = F32
    rows: tuple = (8,)  # (N,) or (N, d1, ...): the logits are (N, C, d1, ...)
    opts: dict = dataclasses.field(default_factory=dict)
    weight: bool = False
    soft: bool = False
    use_lse: bool = False  # the returned lse enters the objective with a random upstream gradient
    starts: Optional[list] = None  # explicit vocab_start_index per group rank
    groups: Optional[list] = None
    torch_path: bool = False  # TRITON_INTERPRET=0 in the worker: the pure-torch fallback
    module: bool = False  # through CrossEntropyLoss instead of the functional API
    compile: bool = False  # under torch.compile(backend="aot_eager")
    repeat: int = 1
    scale: float = 3.0
    offset: float = 0.0
    inf_rank: Optional[int] = None  # this group rank's whole shard is -inf (padded vocabulary)
    force_local: Optional[tuple] = None  # (group rank, local id): row 1's target lands there
    bad_target: Optional[int] = None  # row 0's target (e.g. beyond the global C)
    weight_len: Optional[int] = None  # a wrong-length weight
    error: Optional[tuple] = None  # (exception name, message fragment) every rank must raise

    @property
    def C(self) -> int:
        return sum(self.sizes)

    @property
    def R(self) -> int:
        return int(torch.tensor(self.rows).prod())

    @property
    def real_starts(self) -> list:
        """Each group rank's first class (explicit, or contiguous in group-rank order)."""
        given = self.starts or [None] * len(self.sizes)
        return [s if s is not None else sum(self.sizes[:i]) for i, s in enumerate(given)]


IGN = dict(ignore_index=-100)
CASES = [
    # bad setups first: the group must stay usable after them (the later cases run in it)
    VP("w2-bad-overlapping-starts", 2, [16, 16], starts=[0, 8], error=("ValueError", "do not tile")),
    VP("w2-bad-start-on-one-rank", 2, [16, 16], starts=[0, None], error=("ValueError", "every rank")),
    VP("w2-bad-empty-shard", 2, [32, 0], error=("ValueError", "at least one class")),
    VP("w2-bad-weight-is-the-shard", 2, [16, 16], weight=True, weight_len=16, error=("ValueError", "weight")),
    VP("w2-bad-target-beyond-C", 2, [16, 16], bad_target=32, error=("IndexError", "out of bounds")),
    VP("w4-bad-starts-overlap-and-gap", 4, [8, 8, 8, 8], starts=[0, 8, 16, 23],
       error=("ValueError", "do not tile")),
    # hard targets
    VP("w2-C64-fp32-equal-mean-ignore", 2, [32, 32], opts=dict(IGN, ignore_frac=0.3)),
    VP("w2-C50-bf16-unequal-sum-smooth-weight", 2, [17, 33], BF16, weight=True,
       opts=dict(IGN, reduction="sum", label_smoothing=0.1, ignore_frac=0.2)),
    VP("w2-C48-fp32-zloss-softcap-scale-none-lse", 2, [24, 24], use_lse=True,
       opts=dict(IGN, reduction="none", lse_square_scale=1e-2, softcap=5.0, logit_scale=1.7,
                 ignore_frac=0.3)),
    VP("w2-C24-3x2-fp16-kdim-smooth", 2, [11, 13], F16, rows=(3, 2), opts=dict(label_smoothing=0.2)),
    VP("w2-C20-fp32-ignore3-collides-with-local-id", 2, [10, 10], force_local=(1, 3),
       opts=dict(ignore_index=3, ignore_frac=0.3, label_smoothing=0.1)),
    VP("w2-C64-fp32-offset1e4-compiled", 2, [32, 32], scale=1.0, offset=1e4, compile=True,
       opts=dict(label_smoothing=0.1)),
    VP("w2-C30-fp32-explicit-starts-swapped", 2, [14, 16], starts=[16, 0], weight=True,
       opts=dict(IGN, ignore_frac=0.2, label_smoothing=0.05)),
    VP("w2-C32-bf16-module-inplace-repeat", 2, [16, 16], BF16, module=True, repeat=2,
       opts=dict(label_smoothing=0.1, inplace_backward=True)),
    VP("w2-C64-fp64-torchpath-smooth-weight-lse", 2, [30, 34], F64, weight=True, use_lse=True,
       torch_path=True, opts=dict(IGN, label_smoothing=0.1, lse_square_scale=1e-3, ignore_frac=0.2)),
    VP("w4-C50257-bf16-unequal-smooth-weight", 4, [12565, 12564, 12564, 12564], BF16, rows=(4,), weight=True,
       opts=dict(IGN, label_smoothing=0.1, ignore_frac=0.25)),
    VP("w4-C37-fp32-unequal-none-lse", 4, [10, 9, 9, 9], use_lse=True,
       opts=dict(IGN, reduction="none", ignore_frac=0.3)),
    VP("w4-C64-fp32-padded-inf-shard", 4, [16, 16, 16, 16], inf_rank=3, weight=True,
       opts=dict(IGN, ignore_frac=0.2)),
    VP("w4-tp2x2-C40-bf16-subgroups-smooth", 4, [20, 20], BF16, groups=[[0, 1], [2, 3]],
       opts=dict(IGN, label_smoothing=0.1, ignore_frac=0.2)),
    # soft targets
    VP("w2-C40-fp32-soft-smooth-weight", 2, [15, 25], soft=True, weight=True, opts=dict(label_smoothing=0.2)),
    VP("w2-C64-fp32-torchpath-soft", 2, [32, 32], soft=True, torch_path=True, use_lse=True,
       opts=dict(lse_square_scale=1e-2)),
    VP("w4-C103-fp16-soft-lse", 4, [26, 26, 26, 25], F16, soft=True, use_lse=True, opts=dict(softcap=4.0)),
]
OK_CASES = [pytest.param(c, id=c.id) for c in CASES if c.error is None]
ERR_CASES = [pytest.param(c, id=c.id) for c in CASES if c.error is not None]


def _targets(c: VP, x: torch.Tensor, starts: list, gen: torch.Generator) -> torch.Tensor:
    """Row i's class lies in shard i % P (every rank owns some targets), some rows ignored."""
    owners = [k for k in range(len(c.sizes)) if k != c.inf_rank and c.sizes[k] > 0]
    flat = torch.empty(c.R, dtype=torch.int64)
    for i in range(c.R):
        k = owners[i % len(owners)]
        flat[i] = starts[k] + int(torch.randint(0, c.sizes[k], (1,), generator=gen))
    ign = c.opts.get("ignore_index", -100)
    if c.opts.get("ignore_frac"):
        drop = torch.rand(c.R, generator=gen) < c.opts["ignore_frac"]
        drop[-1], drop[0] = True, False
        flat[drop] = ign
    if c.force_local is not None:
        k, j = c.force_local
        flat[1] = starts[k] + j
    if c.bad_target is not None:
        flat[0] = c.bad_target
    return flat.view(c.rows)


def _build(c: VP, seed: int) -> tuple[dict, list]:
    """The worker's case dict and the full-vocabulary inputs of each TP group."""
    gen = torch.Generator().manual_seed(seed)
    groups = c.groups or [list(range(c.world))]
    real_starts = c.real_starts
    data = []
    for _ in groups:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        shape = (c.rows[0], c.C, *c.rows[1:])
        x = (logits(shape, F32, "cpu", scale=c.scale) + c.offset).to(c.dtype)
        if c.inf_rank is not None:
            x.narrow(1, real_starts[c.inf_rank], c.sizes[c.inf_rank]).fill_(float("-inf"))
        tgt = probabilities(x) if c.soft else _targets(c, x, real_starts, gen)
        w = class_weight(c.weight_len or c.C, c.dtype, "cpu") if c.weight else None
        g = upstream(tuple(c.rows) if c.opts.get("reduction") == "none" else (), c.dtype, "cpu",
                     c.opts.get("reduction", "mean"), gen)
        h = upstream(tuple(c.rows), c.dtype, "cpu", "none", gen) if c.use_lse else None
        data.append(dict(x=x, target=tgt, weight=w, g=g, h=h))
    opts = {k: v for k, v in c.opts.items() if k != "ignore_frac"}
    if c.use_lse:
        opts["return_lse"] = True
    spec = dict(id=c.id, sizes=c.sizes, starts=c.starts, groups=groups, data=data, opts=opts,
                torch_path=c.torch_path, module=c.module, compile=c.compile, repeat=c.repeat)
    return spec, data


def _spawn(world: int, tmp: pathlib.Path) -> tuple[dict, dict]:
    """Run every case of ``world`` in one group of ``world`` processes:
    ({case id: [result of each rank]}, {case id: the full-vocabulary inputs of each TP group})."""
    built = {c.id: _build(c, seed=i) for i, c in enumerate(CASES) if c.world == world}
    results = run_group(WORKER, world, [spec for spec, _ in built.values()], tmp, SPAWN_TIMEOUT_S)
    return results, {cid: d for cid, (_, d) in built.items()}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return cached_spawner(_spawn, tmp_path_factory, "vp")


_ok = assert_ranks_ok


@pytest.mark.parametrize("case", OK_CASES)
def test_matches_full_vocabulary(case: VP, results):
    """Every rank: the same loss/lse; loss, lse, concatenated shard gradients vs float64 truth."""
    res, data = (table[case.id] for table in results(case.world))
    _ok(res)
    for gi, d in enumerate(data):
        ranks = sorted((o for o in res if o["group_index"] == gi), key=lambda o: o["group_rank"])
        for o in ranks[1:]:  # the same loss, bit for bit, on every rank
            assert torch.equal(o["loss"], ranks[0]["loss"]), "ranks disagree on the loss"
            if case.use_lse:
                assert torch.equal(o["lse"], ranks[0]["lse"]), "ranks disagree on the lse"
        assert all(o["inplace_ok"] for o in ranks), "inplace_backward: the input must hold the gradient"
        order = sorted(ranks, key=lambda o: case.real_starts[o["group_rank"]])
        grad = torch.cat([o["grad"] for o in order], dim=0 if d["x"].dim() == 1 else 1)
        opts = dict(case.opts, **({"return_lse": True} if case.use_lse else {}))
        opts.pop("ignore_frac", None)
        g_fn, h_fn = (lambda s: d["g"]), (lambda s: d["h"])
        ref = run_composed(d["x"], d["target"], d["weight"], F64, g_fn, h_fn, case.use_lse, **opts)
        theirs = run_composed(d["x"], d["target"], d["weight"], case.dtype, g_fn, h_fn, case.use_lse, **opts)
        # loss and lse in the compute dtype, like the single-device call: float64 for float64 logits
        out_dtype = case.dtype
        assert ranks[0]["loss"].dtype == (F64 if case.dtype == F64 else F32)
        assert_rule("loss", ranks[0]["loss"], theirs.loss, ref.loss, out_dtype)
        if case.use_lse:
            assert_rule("lse", ranks[0]["lse"], theirs.lse, ref.lse, out_dtype)
        assert grad.dtype == case.dtype
        assert_rule("grad", grad, theirs.grad, ref.grad, out_dtype)
        if not case.soft:  # ignored rows: exactly zero gradient on every shard
            ignored = (d["target"] == case.opts.get("ignore_index", -100)).reshape(-1)
            rows = grad.movedim(1, -1).reshape(-1, case.C)
            assert ignored.any() == bool(case.opts.get("ignore_frac")), "table: ignored rows as intended"
            if not case.use_lse:
                assert torch.all(rows[ignored] == 0), "ignored rows must get zero gradient"


@pytest.mark.parametrize("case", OK_CASES)
def test_collectives_per_call(case: VP, results):
    """Forward: the layout / agreement all_gather (a few float64 per rank, EVERY call: no cache)
    + all_reduce MAX of R values + all_reduce SUM of k*R values (k = 2 hard, 3 with smoothing or
    soft targets); backward: nothing."""
    res = results(case.world)[0][case.id]
    _ok(res)
    item = 8 if case.dtype == F64 else 4
    k = 3 if (case.soft or case.opts.get("label_smoothing", 0) > 0) else 2
    for o in res:
        for call in o["calls"]:
            first, *rest = call["fwd"]
            assert first[0] == "all_gather" and 0 < first[2] <= 8 * LAYOUT_FLOATS, first
            assert rest == [("all_reduce", "max", case.R * item), ("all_reduce", "sum", k * case.R * item)]
            assert call["bwd"] == [], "backward must not communicate"


@pytest.mark.parametrize("case", ERR_CASES)
def test_bad_setup_raises_on_every_rank(case: VP, results):
    res = results(case.world)[0][case.id]
    name, fragment = case.error
    for r, out in enumerate(res):
        assert out.get("error") == name, \
            f"rank {r}: expected {name}, got {out.get('error')}: {out.get('message')}"
        assert fragment in out["message"], out["message"]


@pytest.mark.parametrize("soft,eps,inf_split", [
    pytest.param(False, 0.0, True, id="hard-inf-split"),
    pytest.param(False, 0.1, False, id="hard-smooth"),
    pytest.param(True, 0.1, False, id="soft-smooth"),
])
def test_merge_splits_equals_one_pass(soft: bool, eps: float, inf_split: bool):
    """Partials of disjoint class ranges (what a class-split producer such as the fused linear head
    emits), merged by ``merge_splits``, equal the partials of one pass over the union (no group)."""
    from xent_triton.core.exchange import VocabShard, localize_target
    from xent_triton.core.options import LossOptions
    from xent_triton.core.partials import merge_splits
    from xent_triton.cross_entropy.parallel import shard_partials

    C, bounds = 40, [0, 15, 28, 40]
    opts = LossOptions(label_smoothing=eps)
    x = torch.randn(6, C) * 3
    if inf_split:
        x[:, 28:] = float("-inf")
    w = class_weight(C, F32, "cpu")
    tgt = probabilities(x.nan_to_num(neginf=0.0)) if soft else torch.randint(0, 28, (6,))
    if not soft:
        tgt[2] = -100
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        shard = VocabShard(a, b - a, C, 0, 3)
        t = tgt[:, a:b].unsqueeze(-1) if soft else localize_target(tgt, shard, -100)
        parts.append(shard_partials(x[:, a:b].unsqueeze(-1), t, w[a:b].clone(), C, opts))
    merged = merge_splits(torch.cat(parts))
    whole_t = tgt.unsqueeze(-1) if soft else localize_target(tgt, VocabShard(0, C, C, 0, 1), -100)
    whole = shard_partials(x.unsqueeze(-1), whole_t, w, C, opts)[0]
    torch.testing.assert_close(merged, whole, rtol=2e-6, atol=2e-5)
