"""Collectives that can never diverge: scenarios that hung (or were silently wrong) with the old
rank-local shard-layout cache, run by gloo groups of 2 and 4 CPU processes under a deadline.

Each case is a SEQUENCE of calls in one program (tests/harness/distributed_worker.py); every call must
either return the float64 full-vocabulary truth on every rank or raise the same error on every
rank, and the group must stay usable for the next call. A rank waiting in a collective the
others skipped raises after gloo's 90 s timeout (recorded as a failure), and the whole spawn has
a deadline: nothing can hang the test run.
"""
from __future__ import annotations

import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

from spawn_group import cached_spawner, run_group
from tolerances import assert_close_rule

WORKER = pathlib.Path(__file__).resolve().parents[1] / "harness" / "distributed_worker.py"
SPAWN_TIMEOUT_S = 240
N, D = 6, 16


def ce(sizes: list, seed: int, groups=None, **kw) -> dict:
    """A vocab-parallel cross_entropy call: per subgroup, full (N, C) logits split in ``sizes``
    (a list of size lists with ``groups``)."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for s in (sizes if groups else [sizes]):
        C = sum(s)
        x, y = torch.randn(N, C, generator=g) * 2, torch.randint(0, C, (N,), generator=g)
        data.append(dict(sizes=s, x=x, y=y))
    return dict(head="ce", groups=groups, data=data, **kw)


def lin(sizes: list, seed: int, **kw) -> dict:
    """A vocab-parallel linear_cross_entropy call over the world group."""
    g = torch.Generator().manual_seed(seed)
    C = sum(sizes)
    data = [dict(sizes=sizes, h=torch.randn(N, D, generator=g), y=torch.randint(0, C, (N,), generator=g),
                 W=torch.randn(C, D, generator=g) / math.sqrt(D))]
    return dict(head="linear", groups=None, data=data, **kw)


def hvp(sizes: list, seed: int, via: str, **opts) -> dict:
    """A Hessian-vector product through the vocab-parallel linear head (W frozen): must raise."""
    d = lin(sizes, seed)["data"][0]
    return dict(kind="hvp", via=via, data=d, opts=opts)


def soft(sizes: list, seed: int, via: str, **opts) -> dict:
    """cross_entropy with a probability target that requires grad, both sharded on the classes."""
    g = torch.Generator().manual_seed(seed)
    C = sum(sizes)
    x = torch.randn(N, C, generator=g) * 2
    p = torch.softmax(torch.randn(N, C, generator=g) * 1.5, 1)
    gout = torch.rand(N, generator=g) + 0.5 if opts.get("reduction") == "none" else torch.tensor(0.7)
    return dict(kind="soft", via=via, data=dict(sizes=sizes, x=x, p=p, g=gout), opts=opts)


TW = torch.rand(N, generator=torch.Generator().manual_seed(99)) + 0.5  # a token_weight
DIFFERS = "differs across the ranks of the process group"


CASES = {
    2: [
        # the stale-layout scenario: [10, 20] -> [20, 10] -> [10, 10]
        dict(id="w2-stale-layout-10-20_20-10_10-10",
             calls=[ce([10, 20], 1), ce([20, 10], 2), ce([10, 10], 3)]),
        dict(id="w2-even-then-uneven", calls=[ce([500, 500], 4), ce([500, 501], 5)]),
        # different heads in one program, with different layouts, then the first again
        dict(id="w2-ce-linear-ce", calls=[ce([12, 20], 6), lin([9, 23], 7), ce([12, 20], 8)]),
        # subgroups of one rank each (a TP group of size 1), then the world group
        dict(id="w2-subgroups-of-one-then-world",
             calls=[ce([[30], [41]], 9, groups=[[0], [1]]), ce([15, 16], 10)]),
        # mismatched options: the same ValueError on every rank, then a correct call
        dict(id="w2-mismatched-smoothing", errors={0: "label_smoothing"},
             calls=[ce([8, 8], 11, rank_opts={1: dict(label_smoothing=0.1)}), ce([8, 8], 12)]),
        dict(id="w2-linear-requires-grad-differs", errors={0: "input_requires_grad"},
             calls=[lin([8, 8], 13, rank_tweak={1: "no_grad"}), lin([8, 8], 14)]),
        # an operand error on ONE rank (weight dtype): raised on every rank after the exchange
        dict(id="w2-linear-bad-dtype-one-rank", errors={0: "invalid inputs on group rank(s) [0]"},
             calls=[lin([8, 8], 15, rank_tweak={0: "bf16"}), lin([8, 8], 16)]),
        # an invalid option on ONE rank (validated before the exchange, it raised alone: hang)
        dict(id="w2-invalid-option-one-rank", errors={0: "invalid inputs on group rank(s) [1]"},
             calls=[ce([8, 8], 31, rank_opts={1: dict(label_smoothing=2.0)}), ce([8, 8], 32)]),
        # an empty shard with a plain process group (it raised alone before: hang)
        dict(id="w2-linear-empty-shard", errors={0: "at least one class", 1: "at least one class"},
             calls=[lin([16, 0], 17), ce([16, 0], 18), lin([7, 9], 19)]),
        # issue 18 item 3: an option the vocab-parallel path refuses, given on ONE rank (it raised
        # alone before the agreement: the other ranks hung in it); on every rank: refused alike
        dict(id="w2-return-stats-or-token-weight-one-rank",
             errors={0: "'return_stats' " + DIFFERS, 1: "'return_stats' " + DIFFERS,
                     2: "'token_weight' " + DIFFERS, 3: "'token_weight' " + DIFFERS,
                     4: "return_stats not supported with a process_group"},
             calls=[ce([8, 8], 33, rank_opts={1: dict(return_stats=True)}),
                    lin([8, 8], 34, rank_opts={0: dict(return_stats=True)}),
                    ce([8, 8], 35, rank_opts={0: dict(token_weight=TW)}),
                    lin([8, 8], 36, rank_opts={1: dict(token_weight=TW)}),
                    lin([8, 8], 37, opts=dict(return_stats=True)), ce([8, 8], 38),
                    # given on every rank, token_weight is supported (the per-row losses are global)
                    ce([7, 9], 51, opts=dict(token_weight=TW)),
                    lin([9, 7], 52, opts=dict(token_weight=TW, reduction="sum"))]),
        dict(id="w2-dtensor-return-stats-or-token-weight-one-rank",
             errors={0: "'return_stats' " + DIFFERS, 1: "'token_weight' " + DIFFERS,
                     2: "return_stats not supported"},
             calls=[dict(ce([8, 8], 54), kind="dtensor_options", data=ce([8, 8], 54)["data"][0],
                         rank_opts={1: dict(return_stats=True)}),
                    dict(lin([8, 8], 55), kind="dtensor_options", data=lin([8, 8], 55)["data"][0],
                         rank_opts={0: dict(token_weight=TW)}),
                    dict(ce([8, 8], 56), kind="dtensor_options", data=ce([8, 8], 56)["data"][0],
                         rank_opts={0: dict(return_stats=True), 1: dict(return_stats=True)}),
                    ce([8, 8], 57)]),
        # issue 18 item 1: a second derivative through the vocab-parallel linear head raises the
        # documented error on every rank (before: create_graph itself failed in an out= GEMM)
        dict(id="w2-linear-second-derivative-raises",
             errors={0: "second derivatives are not implemented", 1: "second derivatives are not implemented",
                     2: "second derivatives are not implemented"},
             calls=[hvp([7, 9], 39, "pg"), hvp([7, 9], 40, "pg", reduction="none"),
                    hvp([8, 8], 41, "dtensor"), lin([7, 9], 42)]),
        # issue 18 item 4: a trainable soft target's gradient = the single device's
        dict(id="w2-soft-target-grad", calls=[
            soft([9, 14], 43, "pg", label_smoothing=0.1), soft([12, 12], 44, "dtensor", reduction="none"),
            soft([10, 13], 45, "pg", weight=torch.rand(23, generator=torch.Generator().manual_seed(3)) * 2)]),
    ],
    4: [
        # the hang: C = 1000 even (250 x 4), then C = 1001 split 253/247/250/251
        dict(id="w4-C1000-even-then-C1001-uneven", calls=[ce([250] * 4, 20), ce([253, 247, 250, 251], 21)]),
        dict(id="w4-subgroups-2x2-then-world", calls=[
            ce([[10, 20], [21, 20]], 22, groups=[[0, 1], [2, 3]]),
            ce([[5, 5], [9, 9]], 23, groups=[[0, 2], [1, 3]]),
            ce([3, 4, 5, 6], 24)]),
        dict(id="w4-ce-linear-mismatch-linear", errors={1: "at least one class", 2: "reduction"}, calls=[
            ce([7, 7, 7, 8], 25), lin([10, 0, 10, 10], 26),
            lin([4, 5, 6, 7], 27, rank_opts={3: dict(reduction="sum")}), lin([4, 5, 6, 7], 28)]),
        dict(id="w4-refused-option-one-rank-then-soft-target-grad",
             errors={0: "'return_stats' " + DIFFERS, 1: "'token_weight' " + DIFFERS,
                     2: "second derivatives are not implemented"},
             calls=[lin([4, 5, 6, 7], 46, rank_opts={2: dict(return_stats=True)}),
                    ce([7, 7, 7, 8], 47, rank_opts={3: dict(token_weight=TW)}),
                    hvp([4, 5, 6, 7], 48, "pg"),
                    soft([5, 6, 7, 8], 49, "pg", label_smoothing=0.2, reduction="sum"),
                    soft([8, 8, 8, 8], 50, "dtensor"), lin([4, 5, 6, 7], 53, opts=dict(token_weight=TW))]),
    ],
}
ALL = [pytest.param(w, c, id=c["id"]) for w, cs in CASES.items() for c in cs]


def _spawn(world: int, tmp: pathlib.Path) -> dict:
    specs = [dict(id=c["id"], calls=c["calls"]) for c in CASES[world]]
    return run_group(WORKER, world, specs, tmp, SPAWN_TIMEOUT_S)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return cached_spawner(_spawn, tmp_path_factory, "hang")


def _reference(call: dict, gi: int) -> dict:
    """float64 loss and gradients of the full vocabulary."""
    d = call["data"][gi]
    opts = dict(call.get("opts", {}))
    tw = opts.pop("token_weight", None)

    def loss_of(z):
        if tw is None:
            return F.cross_entropy(z, d["y"], **opts)
        red = opts.pop("reduction", "mean")
        rows = F.cross_entropy(z, d["y"], reduction="none", **opts) * tw.double()
        den = (tw.double() * (d["y"] != -100)).sum()
        return rows if red == "none" else rows.sum() / den if red == "mean" else rows.sum()

    if call["head"] == "ce":
        x = d["x"].double().requires_grad_()
        loss = loss_of(x)
        loss.backward()
        return dict(loss=loss.detach(), grad=x.grad)
    h, W = d["h"].double().requires_grad_(), d["W"].double().requires_grad_()
    loss = loss_of(F.linear(h, W))
    loss.backward()
    return dict(loss=loss.detach(), dW=W.grad, dh=h.grad)


@pytest.mark.parametrize("world,case", ALL)
def test_every_call_correct_or_same_error_everywhere(world: int, case: dict, results):
    res = results(world)[case["id"]]
    for r, out in enumerate(res):
        assert "error" not in out, f"rank {r}: {out.get('traceback')}"
    errors = case.get("errors", {})
    for i, call in enumerate(case["calls"]):
        outs = [o["calls"][i] for o in res]
        if i in errors:
            for r, o in enumerate(outs):
                assert "error" in o, f"call {i}: rank {r} returned instead of raising"
                assert "timed out" not in o["message"].lower() and "timeout" not in o["message"].lower(), o
                failing = "invalid inputs on group rank(s) [" + str(r) + "]" in errors[i]
                if not failing:
                    assert errors[i] in o["message"], f"call {i} rank {r}: {o['message']}"
            continue
        for r, o in enumerate(outs):
            assert "error" not in o, f"call {i} rank {r}: {o.get('traceback')}"
        if call.get("kind") == "soft":
            _check_soft(call, outs)
            continue
        for gi in range(len(call["data"])):
            ranks = sorted((o for o in outs if o["group_index"] == gi), key=lambda o: o["group_rank"])
            ref = _reference(call, gi)
            for o in ranks:
                assert torch.equal(o["loss"], ranks[0]["loss"]), "ranks disagree on the loss"
            torch.testing.assert_close(ranks[0]["loss"].double(), ref["loss"], rtol=2e-6, atol=2e-6)
            if call["head"] == "ce":
                grad = torch.cat([o["grad"] for o in ranks], 1)
                torch.testing.assert_close(grad.double(), ref["grad"], rtol=1e-5, atol=2e-7)
            else:
                dW = torch.cat([o["dW"] for o in ranks], 0)
                torch.testing.assert_close(dW.double(), ref["dW"], rtol=1e-5, atol=2e-6)
                for o in ranks:
                    torch.testing.assert_close(o["dh"].double(), ref["dh"], rtol=1e-5, atol=2e-6)



def _check_soft(call: dict, outs: list) -> None:
    """Loss, logits gradient and TARGET gradient vs float64 torch, under the tolerance rule (torch's
    own float32 error on the same inputs); every rank returns the same loss."""
    d = call["data"]

    def run(dtype):
        x, p = d["x"].to(dtype).requires_grad_(), d["p"].to(dtype).requires_grad_()
        kw = dict(call["opts"])
        if "weight" in kw:
            kw["weight"] = kw["weight"].to(dtype)
        loss = F.cross_entropy(x, p, **kw)
        (loss * d["g"].to(dtype)).sum().backward()
        return loss.detach(), x.grad, p.grad

    ref, theirs = run(torch.float64), run(torch.float32)
    if call["via"] == "pg":
        ours = (outs[0]["loss"], *(torch.cat([o[k] for o in outs], 1) for k in ("grad", "tgrad")))
    else:
        ours = (outs[0]["loss"], outs[0]["grad"], outs[0]["tgrad"])
    for o in outs:
        assert torch.equal(o["loss"], outs[0]["loss"]), "ranks disagree on the loss"
    for name, a, t, r in zip(("loss", "d_logits", "d_target"), ours, theirs, ref):
        assert_close_rule(name, a, t, r, torch.float32)
