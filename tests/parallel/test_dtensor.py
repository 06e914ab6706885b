"""DTensor in, DTensor semantics out: ``cross_entropy`` / ``linear_cross_entropy`` on DTensors
(``init_device_mesh("cpu", ...)`` over gloo, 2 and 4 spawned ranks) against the single-process
float64 truth on the full tensors: loss (mean over ALL tokens of the mesh), lse, and gradients,
which must come back with the placements of the inputs. Even and uneven (``torch.chunk``) shards,
a rank with no class (C = 5 over 4), batch-sharded 2-D meshes, replicated (local) inputs, and the
FSDP2 rule (a Shard(0) weight with plain hidden states raises on every rank).
"""
from __future__ import annotations

import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

from spawn_group import cached_spawner, run_group

WORKER = pathlib.Path(__file__).resolve().parents[1] / "harness" / "distributed_worker.py"
SPAWN_TIMEOUT_S = 300
S0, S1, SL, R = ("S", 0), ("S", 1), ("S", -1), "R"


def ce(cid: str, mesh: tuple, shape: tuple, x_pl: list, y_pl=None, dtype=torch.float32, ignore_rows=(),
       **opts) -> dict:
    g = torch.Generator().manual_seed(len(cid))
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    C = shape[1] if len(shape) > 1 else shape[0]
    y = torch.randint(0, C, shape[:1] + shape[2:], generator=g)
    for r in ignore_rows:
        y[r] = -100
    rows = tuple(y.shape) if opts.get("reduction") == "none" else ()
    gout = torch.rand(rows, generator=g, dtype=torch.float64).to(torch.float32) + 0.5
    h = torch.rand(y.shape, generator=g).to(dtype) if opts.get("return_lse") else None
    return dict(id=cid, calls=[dict(kind="dtensor_ce", mesh=mesh, x=x, y=y, x_pl=x_pl, y_pl=y_pl, opts=opts,
                                    g=gout.to(dtype), h=h)])


def lin(cid: str, mesh: tuple, N: int, C: int, D: int, h_pl, W_pl, y_pl=None, bias=True, **opts) -> dict:
    g = torch.Generator().manual_seed(len(cid) + 7)
    call = dict(kind="dtensor_linear", mesh=mesh, h=torch.randn(N, D, generator=g),
                W=torch.randn(C, D, generator=g) / math.sqrt(D),
                b=torch.randn(C, generator=g) if bias else None,
                y=torch.randint(0, C, (N,), generator=g), h_pl=h_pl, W_pl=W_pl, y_pl=y_pl, opts=opts,
                g=torch.tensor(0.75) if opts.get("reduction") != "none" else torch.rand(N, generator=g) + 0.5)
    return dict(id=cid, calls=[call])


W30, W23 = (torch.rand(c, generator=torch.Generator().manual_seed(c)) * 2 + 0.1 for c in (30, 23))
CASES = {
    2: [
        ce("w2-ce-C64-Shard1-mean-smooth-ignore", (2,), (8, 64), [S1], ignore_rows=(2,), label_smoothing=0.1),
        ce("w2-ce-C37-uneven-Shard-1-none-lse-zloss", (2,), (6, 37), [SL], reduction="none", return_lse=True,
           lse_square_scale=1e-2),
        ce("w2-ce-C40-replicated-local", (2,), (5, 40), [R]),
        ce("w2-ce-C30-batch-sharded-global-mean", (2,), (7, 30), [S0], y_pl=[S0], ignore_rows=(0, 1, 2)),
        # issue 18 item 17: class weights on a batch-sharded mesh: the mean divides by sum w_y
        ce("w2-ce-C30-batch-sharded-class-weight-mean", (2,), (7, 30), [S0], y_pl=[S0], ignore_rows=(1,),
           weight=W30),
        lin("w2-lin-C30-batch-sharded-class-weight-mean", (2,), 9, 30, 8, [S0], [R], y_pl=[S0], weight=W30),
        ce("w2-ce-3d-C21-Shard1-sum", (2,), (4, 21, 3), [S1], reduction="sum", softcap=5.0),
        ce("w2-ce-C33-fp64-Shard1", (2,), (5, 33), [S1], dtype=torch.float64, label_smoothing=0.2),
        lin("w2-lin-C64-colwise-bias", (2,), 8, 64, 16, [R], [S0]),
        lin("w2-lin-C37-uneven-smooth", (2,), 6, 37, 8, [R], [S0], label_smoothing=0.1),
        lin("w2-lin-C20-replicated-local", (2,), 5, 20, 8, [R], [R], bias=False),
        lin("w2-lin-fsdp-rule-plain-hidden", (2,), 4, 16, 8, None, [S0], bias=False),
        dict(id="w2-torchtitan-loss-Shard-1-global-valid-tokens", calls=[dict(
            kind="titan", mesh=(2,), pred=torch.randn(2, 3, 21, generator=torch.Generator().manual_seed(5)),
            labels=torch.tensor([[3, 20, -100], [0, 7, 11]]), global_valid_tokens=torch.tensor(9))]),
    ],
    4: [
        ce("w4-ce-C50257-Shard1", (4,), (3, 50257), [S1], label_smoothing=0.1),
        ce("w4-ce-C5-empty-rank", (4,), (6, 5), [S1], ignore_rows=(1,)),
        lin("w4-lin-C5-empty-rank", (4,), 6, 5, 8, [R], [S0]),
        lin("w4-lin-C1001-uneven-none", (4,), 5, 1001, 16, [R], [S0], reduction="none"),
        ce("w4-ce-2d-dp-tp-C37-dp-rank-fully-masked", (2, 2), (8, 37), [S0, S1], y_pl=[S0, R],
           ignore_rows=(0, 1, 2, 3), empty_batch="zero"),
        lin("w4-lin-2d-dp-tp-C23", (2, 2), 8, 23, 8, [S0, R], [R, S0], y_pl=[S0, R]),
        lin("w4-lin-2d-dp-tp-C23-class-weight-mean", (2, 2), 8, 23, 8, [S0, R], [R, S0], y_pl=[S0, R],
            weight=W23),
    ],
}
ERRORS = {"w2-lin-fsdp-rule-plain-hidden": ("TypeError", "FSDP2")}
ALL = [pytest.param(w, c, id=c["id"]) for w, cs in CASES.items() for c in cs]


def _spawn(world: int, tmp: pathlib.Path) -> dict:
    return run_group(WORKER, world, CASES[world], tmp, SPAWN_TIMEOUT_S)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return cached_spawner(_spawn, tmp_path_factory, "dt")


def _close(name, ours, ref, dtype):
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(ours.double(), ref, **tol, msg=lambda m: f"{name}: {m}")


def _torch_opts(opts: dict) -> dict:
    """The options F.cross_entropy takes, class weights in float64."""
    out = {k: v for k, v in opts.items() if k in ("reduction", "label_smoothing", "weight")}
    if "weight" in out:
        out["weight"] = out["weight"].double()
    return out


def _check_ce(call, outs):
    x = call["x"].double().requires_grad_()
    opts = _torch_opts(call["opts"])
    logits = x
    if "softcap" in call["opts"]:
        logits = call["opts"]["softcap"] * torch.tanh(x / call["opts"]["softcap"])
    loss = F.cross_entropy(logits, call["y"], **opts)
    lse = torch.logsumexp(logits, 1)
    zl = call["opts"].get("lse_square_scale", 0.0)
    valid = call["y"] != -100
    if zl:
        loss = loss + zl * torch.where(valid, lse, 0.0) ** 2
    if call["opts"].get("empty_batch") == "zero" and not valid.any():
        loss = loss.nan_to_num(0.0)
    obj = (loss * call["g"].double()).sum()
    if call["h"] is not None:
        obj = obj + (lse * call["h"].double()).sum()
    obj.backward()
    for r, o in enumerate(outs):
        _close(f"rank {r} loss", o["loss"]["value"], loss.detach(), call["x"].dtype)
        want = torch.float64 if call["x"].dtype == torch.float64 else torch.float32
        assert o["loss"]["value"].dtype == want
        _close(f"rank {r} grad", o["grad"]["value"], x.grad, call["x"].dtype)
        want = [str(p) for p in _pl(call["x_pl"], call["x"].dim())]
        assert o["grad"]["placements"] == want, o["grad"]["placements"]
        if call["h"] is not None:
            _close(f"rank {r} lse", o["lse"]["value"], lse.detach(), call["x"].dtype)
        if call["opts"].get("reduction", "mean") != "none":
            assert o["loss"]["placements"] == ["R"] * len(call["x_pl"]), o["loss"]["placements"]


def _check_linear(call, outs):
    h, W = call["h"].double().requires_grad_(), call["W"].double().requires_grad_()
    b = call["b"].double().requires_grad_() if call["b"] is not None else None
    opts = _torch_opts(call["opts"])
    loss = F.cross_entropy(F.linear(h, W, b), call["y"], **opts)
    (loss * call["g"].double()).sum().backward()
    for r, o in enumerate(outs):
        _close(f"rank {r} loss", o["loss"]["value"], loss.detach(), torch.float32)
        _close(f"rank {r} dh", o["dh"]["value"], h.grad, torch.float32)
        _close(f"rank {r} dW", o["dW"]["value"], W.grad, torch.float32)
        assert o["dW"]["placements"] == [str(p) for p in _pl(call["W_pl"])]
        assert o["dh"]["placements"] == [str(p) for p in _pl(call["h_pl"])]
        if b is not None:
            _close(f"rank {r} db", o["db"]["value"], b.grad, torch.float32)


def _pl(spec, ndim: int = 2):
    """Placements of a spec, Shard dims normalised (DTensor stores Shard(-1) as Shard(ndim - 1))."""
    from torch.distributed.tensor import Replicate, Shard
    return [Replicate() if p == "R" else Shard(p[1] % ndim) for p in spec]


@pytest.mark.parametrize("world,case", ALL)
def test_dtensor_matches_float64_reference(world: int, case: dict, results):
    outs = [o["calls"][0] for o in results(world)[case["id"]]]
    if case["id"] in ERRORS:
        name, frag = ERRORS[case["id"]]
        for r, o in enumerate(outs):
            assert o.get("error") == name and frag in o["message"], f"rank {r}: {o}"
        return
    for r, o in enumerate(outs):
        assert "error" not in o, f"rank {r}: {o.get('traceback')}"
    call = case["calls"][0]
    check = {"dtensor_ce": _check_ce, "dtensor_linear": _check_linear, "titan": _check_titan}
    check[call["kind"]](call, outs)


def _check_titan(call, outs):
    """torchtitan-style: this rank's sum over valid tokens / global_valid_tokens; plain tensor out;
    the gradient keeps the logits' Shard(-1) placement."""
    pred = call["pred"].double().requires_grad_()
    y = call["labels"].flatten()
    loss = F.cross_entropy(pred.flatten(0, 1), y, reduction="sum", label_smoothing=0.1) / 9.0
    loss.backward()
    for r, o in enumerate(outs):
        assert not o["is_dtensor"]
        _close(f"rank {r} loss", o["loss"], loss.detach(), torch.float32)
        _close(f"rank {r} grad", o["grad"]["value"], pred.grad, torch.float32)
        assert o["grad"]["placements"] == ["S(2)"]
        assert int(o["metrics"]["loss_metrics/local_valid_tokens"]) == 5
        assert int(o["metrics"]["loss_metrics/global_valid_tokens"]) == 9


@pytest.mark.parametrize("world,case", [p for p in ALL if p.values[1]["id"] not in ERRORS])
def test_dtensor_communication_is_O_of_tokens(world: int, case: dict, results):
    """The collectives our code issues through torch.distributed (layout exchange, MAX / SUM of
    per-token partials, the linear head's dX all-reduce) are O(tokens), never O(tokens x C)."""
    call = case["calls"][0]
    outs = [o["calls"][0] for o in results(world)[case["id"]]]
    tokens = (call["y"] if "y" in call else call["labels"]).numel()
    D = call["h"].shape[1] if "h" in call and call["kind"] == "dtensor_linear" else 1
    # a head weight / bias replicated over a batch-sharded mesh dim: the data-parallel gradient
    # all-reduce of its (C, D) + (C,) local part (O(parameters), independent of the tokens)
    dp = call["kind"] == "dtensor_linear" and S0 in (call["h_pl"] or [])
    params = 4 * (call["W"].numel() + call["W"].shape[0]) if dp else 0
    for o in outs:
        fwd = sum(c[2] for c in o["fwd"])
        bwd = sum(c[2] for c in o["bwd"])
        assert fwd <= 8 * 4 * tokens + 256, o["fwd"]
        assert bwd <= 8 * tokens * D + params + 64, o["bwd"]
