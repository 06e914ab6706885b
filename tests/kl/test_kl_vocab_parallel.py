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
ROWS = (2, 3)
R = 6


@dataclasses.dataclass
class KC:
    """One case: C = sum(sizes) classes split over the ranks in rank order."""
    id: str
    world: int
    sizes: list
    fn: str = "logprobs"  # or "distill"
    opts: dict = dataclasses.field(default_factory=dict)
    dtype: torch.dtype = F32
    labels: bool = False  # distill: labels (a third of them ignore_index)
    torch_path: bool = False  # TRITON_INTERPRET=0 in the worker
    rank_opts: dict = dataclasses.field(default_factory=dict)  # rank -> options overriding opts
    teacher_trim: dict = dataclasses.field(default_factory=dict)  # rank -> columns cut off its teacher
    error: bool = False  # every rank must raise ValueError
    module: bool = False  # through the module form (TokenLogprobs, DistillationLoss, Linear...)
    dtensor: bool = False  # logits (and teacher) as DTensors Shard(-1): sizes = the torch.chunk layout
    mesh: tuple = ()  # the linear forms on a mesh of this shape: hidden / head placements h_pl / w_pl
    h_pl: tuple = ()  # per mesh dim: "S" (Shard(0): tokens, or classes for the head), "C" (Shard(-1):
    # the logits' classes) or "R"
    w_pl: tuple = ()


LP = "logprobs"
D, DT = 5, 4  # hidden sizes of the linear forms (student, teacher)
CASES = [
    KC("lp-w2-even-ent", 2, [7, 7], opts=dict(temperature=0.7, return_entropy=True)),
    KC("lp-w2-uneven", 2, [4, 9]),
    KC("lp-w2-empty-ent-bf16", 2, [0, 13], opts=dict(temperature=2.0, return_entropy=True), dtype=BF16),
    KC("lp-w2-uneven-ent-torch", 2, [5, 8], opts=dict(temperature=1.3, return_entropy=True), torch_path=True),
    KC("lp-w4-even-ent", 4, [4, 4, 4, 4], opts=dict(temperature=0.5, return_entropy=True)),
    KC("lp-w4-empty-ent-torch", 4, [5, 0, 4, 4], opts=dict(return_entropy=True), torch_path=True),
    KC("kl-w2-even-ce", 2, [7, 7], "distill", dict(divergence="kl", ce_weight=0.3), labels=True),
    KC("rkl-w2-empty-bf16", 2, [0, 13], "distill", dict(divergence="reverse_kl", temperature=2.0,
                                                         reduction="sum"), dtype=BF16),
    KC("jsd-w2-uneven-none", 2, [4, 9], "distill", dict(divergence="jsd", beta=0.3, temperature=0.5,
                                                         reduction="none"), labels=True, torch_path=True),
    KC("kl-w4-empty-sum-ce", 4, [5, 0, 4, 4], "distill", dict(divergence="kl", reduction="sum",
                                                               ce_weight=0.5, temperature=2.0), labels=True),
    KC("rkl-w4-even-mean", 4, [4, 4, 4, 4], "distill", dict(divergence="reverse_kl"), labels=True),
    KC("jsd-w4-uneven-ce", 4, [3, 5, 0, 5], "distill", dict(divergence="jsd", beta=0.7, ce_weight=0.2,
                                                             reduction="none"), labels=True),
    KC("llp-w2-uneven-ent", 2, [4, 9], "linear_logprobs", dict(temperature=0.7, return_entropy=True,
                                                                chunk_size=4)),
    KC("llp-w4-empty-torch", 4, [5, 0, 4, 4], "linear_logprobs", dict(temperature=1.5), torch_path=True),
    KC("ljsd-w2-empty-ce", 2, [0, 13], "linear_distill", dict(divergence="jsd", ce_weight=0.4, chunk_size=4),
       labels=True),
    KC("lkl-w4-uneven-none", 4, [3, 5, 0, 5], "linear_distill", dict(divergence="kl", temperature=2.0,
                                                                      chunk_size=5,
                                                                      reduction="none"), labels=True),
    KC("lrkl-w4-even-bf16", 4, [4, 4, 4, 4], "linear_distill", dict(divergence="reverse_kl"), dtype=BF16),
    KC("dt-lp-w2-ent", 2, [7, 6], opts=dict(temperature=0.8, return_entropy=True), dtensor=True),
    KC("dt-lp-w4-empty", 4, [2, 2, 1, 0], opts=dict(return_entropy=True), dtensor=True),
    KC("dt-jsd-w2-mean-ce", 2, [7, 6], "distill", dict(divergence="jsd", ce_weight=0.3), labels=True,
       dtensor=True),
    KC("dt-kl-w4-empty-none", 4, [4, 4, 4, 1], "distill", dict(reduction="none", temperature=0.5),
       labels=True, dtensor=True),
    KC("mod-lp-w2-ent", 2, [5, 8], opts=dict(temperature=0.9, return_entropy=True), module=True),
    KC("mod-jsd-w4-ce", 4, [3, 5, 0, 5], "distill", dict(divergence="jsd", ce_weight=0.2), labels=True,
       module=True),
    KC("mod-llp-w4-ent", 4, [4, 4, 4, 4], "linear_logprobs", dict(return_entropy=True), module=True),
    KC("mod-lrkl-w2-sum", 2, [7, 7], "linear_distill", dict(divergence="reverse_kl", reduction="sum"),
       labels=True, module=True),
    # the linear forms on DTensors: hidden Replicate, heads Shard(0) (sizes = the torch.chunk layout)
    KC("dt-llp-w2-ent", 2, [7, 6], "linear_logprobs", dict(temperature=0.7, return_entropy=True),
       dtensor=True),
    KC("dt-llp-w4-even-bf16", 4, [4, 4, 4, 4], "linear_logprobs", dict(temperature=1.5), dtype=BF16,
       dtensor=True),
    KC("dt-llp-w4-empty-ent-torch", 4, [2, 2, 1, 0], "linear_logprobs", dict(return_entropy=True),
       torch_path=True, dtensor=True),
    KC("dt-lkl-w2-mean-ce", 2, [7, 6], "linear_distill", dict(divergence="kl", ce_weight=0.3, chunk_size=4,
                                                               temperature=2.0), labels=True, dtensor=True),
    KC("dt-ljsd-w4-empty-none", 4, [2, 2, 1, 0], "linear_distill", dict(divergence="jsd", beta=0.3,
                                                                       chunk_size=2,
                                                                       reduction="none"), labels=True,
       dtensor=True),
    KC("dt-lrkl-w4-uneven-sum-bf16", 4, [4, 4, 4, 1], "linear_distill", dict(divergence="reverse_kl",
                                                                             reduction="sum"), dtype=BF16,
       dtensor=True),
    KC("dt-ljsd-w2-torch", 2, [7, 6], "linear_distill", dict(divergence="jsd", ce_weight=0.5), labels=True,
       torch_path=True, dtensor=True),
    # errors: one rank differs; every rank must raise (ValueError), none may hang
    KC("err-w2-lp-temperature", 2, [4, 9], rank_opts={1: dict(temperature=2.0)}, error=True),
    KC("err-w2-lp-bad-temperature", 2, [4, 9], rank_opts={0: dict(temperature=-1.0)}, error=True),
    KC("err-w2-distill-layout", 2, [7, 7], "distill", teacher_trim={1: 1}, error=True),
    KC("err-w2-distill-divergence", 2, [7, 7], "distill", rank_opts={0: dict(divergence="jsd")}, error=True),
    KC("err-w4-distill-layout", 4, [4, 4, 4, 4], "distill", teacher_trim={2: 1}, error=True),
    KC("err-w2-linear-layout", 2, [7, 7], "linear_distill", teacher_trim={0: 1}, error=True),
    KC("err-w4-llp-temperature", 4, [4, 4, 4, 4], "linear_logprobs", rank_opts={2: dict(temperature=0.5)},
       error=True),
    KC("err-w4-lp-entropy", 4, [5, 0, 4, 4], rank_opts={3: dict(return_entropy=True)}, error=True),
    # softcap / token_weight are agreed on: one rank passing another (or none), or a bad weight, raises
    KC("err-w2-lp-softcap-one", 2, [4, 9], rank_opts={1: dict(softcap=5.0)}, error=True),
    KC("err-w2-distill-softcap-differs", 2, [7, 7], "distill", dict(softcap=5.0),
       rank_opts={1: dict(softcap=6.0)}, error=True),
    KC("err-w4-ldistill-tw-one", 4, [4, 4, 4, 4], "linear_distill",
       rank_opts={0: dict(token_weight=torch.ones(2, 3))}, error=True),
    KC("err-w2-llp-softcap-one", 2, [7, 7], "linear_logprobs", rank_opts={0: dict(softcap=5.0)}, error=True),
    KC("err-w2-dt-lp-softcap-one", 2, [7, 6], rank_opts={1: dict(softcap=5.0)}, dtensor=True, error=True),
    KC("err-w2-lp-tw-shape-one", 2, [4, 9], opts=dict(token_weight=torch.ones(2, 3)),
       rank_opts={1: dict(token_weight=torch.ones(3, 2))}, error=True),
    KC("err-dt-w2-llp-temperature", 2, [7, 6], "linear_logprobs", rank_opts={1: dict(temperature=2.0)},
       error=True, dtensor=True),
    KC("err-dt-w4-ld-teacher-layout", 4, [4, 4, 4, 1], "linear_distill", teacher_trim={2: 1}, error=True,
       dtensor=True),  # DTensor: that rank's teacher head is Replicate, the others' Shard(0)
    KC("err-dt-w4-ld-divergence", 4, [2, 2, 1, 0], "linear_distill", rank_opts={0: dict(divergence="jsd")},
       error=True, dtensor=True),
    KC("err-llp-acc", 2, [7, 7], "linear_logprobs", rank_opts={1: dict(grad_accum_dtype=BF16)}, error=True),
]
# DTensor meshes with token-sharded dims: checked on the full tensors
# softcap (each shard caps its own logits, before the temperature) and token_weight (on the per-row
# results) under process_group and DTensor, world 2, uneven shards; TW: random positive weights
TW = torch.rand(2, 3, generator=torch.Generator().manual_seed(7)) + 0.25
CAP = dict(softcap=4.0, token_weight=TW)
CASES += [
    KC("cap-lp-w2-uneven-ent", 2, [4, 9], opts=dict(CAP, temperature=0.7, return_entropy=True)),
    KC("cap-lp-w2-uneven-torch", 2, [5, 8], opts=dict(CAP, temperature=1.3), torch_path=True),
    KC("cap-kl-w2-uneven-ce", 2, [4, 9], "distill", dict(CAP, divergence="kl", ce_weight=0.3,
                                                          temperature=2.0), labels=True),
    KC("cap-rkl-w2-empty-none", 2, [0, 13], "distill", dict(CAP, divergence="reverse_kl", reduction="none"),
       labels=True),
    KC("cap-jsd-w2-uneven-ce-torch", 2, [5, 8], "distill", dict(CAP, divergence="jsd", ce_weight=0.4,
                                                                 temperature=0.5), labels=True,
       torch_path=True),
    KC("cap-llp-w2-uneven-ent", 2, [4, 9], "linear_logprobs", dict(CAP, return_entropy=True, chunk_size=4)),
    KC("cap-ljsd-w2-uneven-ce", 2, [4, 9], "linear_distill", dict(CAP, divergence="jsd", ce_weight=0.3,
                                                                   chunk_size=4), labels=True),
    KC("dt-cap-lp-w2-ent", 2, [7, 6], opts=dict(CAP, temperature=0.8, return_entropy=True), dtensor=True),
    KC("dt-cap-kl-w2-ce-sum", 2, [7, 6], "distill", dict(CAP, ce_weight=0.3, reduction="sum"), labels=True,
       dtensor=True),
    KC("dt-cap-llp-w2-torch", 2, [7, 6], "linear_logprobs", dict(CAP, temperature=0.7), torch_path=True,
       dtensor=True),
    KC("dt-cap-lrkl-w2-ce", 2, [7, 6], "linear_distill", dict(CAP, divergence="reverse_kl", ce_weight=0.3,
                                                               chunk_size=4), labels=True, dtensor=True),
]
MESH_CASES = [
    KC("mesh-lp-w4-dp2-tp2-ent", 4, [7, 6], opts=dict(temperature=0.7, return_entropy=True), mesh=(2, 2),
       h_pl=("S", "C")),
    KC("mesh-jsd-w4-tp2-dp2-ce", 4, [7, 6], "distill", dict(divergence="jsd", ce_weight=0.2), labels=True,
       mesh=(2, 2), h_pl=("C", "S")),
    KC("mesh-kl-w4-dp2-tp2-none", 4, [7, 6], "distill", dict(reduction="none", temperature=2.0),
       labels=True, mesh=(2, 2), h_pl=("S", "C")),
    KC("mesh-llp-w2-dp-only", 2, [13], "linear_logprobs", dict(temperature=0.8, return_entropy=True),
       mesh=(2,), h_pl=("S",), w_pl=("R",)),  # no TP dim: the single-device op on the local tokens
    KC("mesh-lkl-w4-dp2-tp2-ce", 4, [7, 6], "linear_distill", dict(divergence="kl", ce_weight=0.3,
                                                                  temperature=2.0, chunk_size=2),
       labels=True, mesh=(2, 2), h_pl=("S", "R"), w_pl=("R", "S")),
    KC("mesh-ljsd-w4-dp2-tp2-none", 4, [7, 6], "linear_distill", dict(divergence="jsd", reduction="none"),
       labels=True, mesh=(2, 2), h_pl=("S", "R"), w_pl=("R", "S")),
    KC("mesh-llp-w4-tp2-dp2", 4, [7, 6], "linear_logprobs", dict(return_entropy=True),
       mesh=(2, 2), h_pl=("R", "S"), w_pl=("S", "R")),
    # softcap + token_weight (a DTensor placed as the tokens): the mean over the whole mesh
    KC("mesh-cap-kl-w4-dp2-tp2-ce", 4, [7, 6], "distill", dict(CAP, ce_weight=0.3), labels=True,
       mesh=(2, 2), h_pl=("S", "C")),
    KC("mesh-cap-llp-w2-dp-only", 2, [13], "linear_logprobs", dict(CAP, return_entropy=True),
       mesh=(2,), h_pl=("S",), w_pl=("R",)),
]
CASES += MESH_CASES
OK_CASES = [c for c in CASES if not c.error and not c.mesh]


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
