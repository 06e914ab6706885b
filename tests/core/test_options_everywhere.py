"""Issue 17 item 4: every option of ``cross_entropy`` / ``linear_cross_entropy`` is honoured on the
``process_group`` and DTensor paths (sharded on the classes, or on the rows only) (the result
equals the float64 single-device truth under the tolerance rule, and ``chunk_size`` /
``inplace_backward`` reach the code they size) or refused
alike on every rank; an option given on ONE rank only raises the same error type on every rank
(no rank is left waiting); ``chunk_size=-3`` and an integer ``grad_accum_dtype`` raise everywhere.

One spawned gloo group of 2 processes runs every case (tests/harness/distributed_worker.py, kind
``opt_call`` in tests/harness/options_cases.py); the single-device half runs here, on both CPU paths.
"""
from __future__ import annotations

import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from spawn_group import cached_spawner, run_group
from tolerances import assert_close_rule
from xent_triton.cross_entropy import ops as ce_ops
from xent_triton.linear import chunked as linear_chunked
from xent_triton.linear import ops as linear_ops

WORKER = pathlib.Path(__file__).resolve().parents[1] / "harness" / "distributed_worker.py"
SPAWN_TIMEOUT_S = 240
N, D = 6, 5
CE_SIZES, LIN_SIZES = [23, 18], [150, 131]  # odd shards; a linear shard spans 2 vocabulary splits
BAD = "invalid inputs on group rank(s) [1]"  # what rank 0 raises when rank 1's option is invalid


def _data(head: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sizes = CE_SIZES if head == "ce" else LIN_SIZES
    C = sum(sizes)
    y = torch.randint(0, C, (N,), generator=g)
    y[2] = -100
    d = dict(sizes=sizes, y=y, g=torch.rand(N, generator=g) + 0.5)
    if head == "ce":
        d["x"] = torch.randn(N, C, generator=g) * 2
    else:
        d["h"] = torch.randn(N, D, generator=g)
        d["W"] = torch.randn(C, D, generator=g) / math.sqrt(D)
    return d


# (id, head, opts on every rank, opts of rank 1 only, expected: "ok" or (error type, rank 0's message))
TABLE = [
    ("ce-base", "ce", {}, {}, "ok"),
    ("ce-smooth-z-none", "ce", dict(label_smoothing=0.1, lse_square_scale=1e-3, reduction="none"), {}, "ok"),
    ("ce-softcap-scale-sum", "ce", dict(softcap=3.0, logit_scale=0.7, reduction="sum"), {}, "ok"),
    ("ce-inplace", "ce", dict(inplace_backward=True), {}, "ok"),
    ("ce-inplace-none", "ce", dict(inplace_backward=True, reduction="none"), {}, "ok"),
    ("ce-stats-refused", "ce", dict(return_stats=True), {}, ("NotImplementedError", "return_stats")),
    ("lin-base", "linear", {}, {}, "ok"),
    ("lin-chunk", "linear", dict(chunk_size=2), {}, "ok"),
    ("lin-chunk-none-smooth", "linear", dict(chunk_size=1, reduction="none", label_smoothing=0.2), {}, "ok"),
    ("lin-accum-fp32", "linear", dict(grad_accum_dtype=torch.float32, softcap=4.0), {}, "ok"),
    ("lin-chunk-neg", "linear", dict(chunk_size=-3), {}, ("ValueError", "chunk_size must be")),
    ("lin-accum-int", "linear", dict(grad_accum_dtype=3), {}, ("ValueError", "grad_accum_dtype must be")),
    ("lin-accum-int64", "linear", dict(grad_accum_dtype=torch.int64), {},
     ("ValueError", "grad_accum_dtype must be")),
    ("lin-stats-refused", "linear", dict(return_stats=True), {}, ("NotImplementedError", "return_stats")),
    # one rank alone
    ("one-chunk-neg", "linear", {}, dict(chunk_size=-3), ("ValueError", BAD)),
    ("one-chunk-differs", "linear", {}, dict(chunk_size=2), ("ValueError", "'chunk_size' differs")),
    ("one-accum-int64", "linear", {}, dict(grad_accum_dtype=torch.int64), ("ValueError", BAD)),
    ("one-stats", "linear", {}, dict(return_stats=True), ("ValueError", "'return_stats' differs")),
    ("one-ce-smoothing", "ce", {}, dict(label_smoothing=2.0), ("ValueError", BAD)),
    ("one-lin-smoothing", "linear", {}, dict(label_smoothing=-1.0), ("ValueError", BAD)),
]
VIAS = ["pg", "dtensor", "dtensor-rows"]
CASES = [(via, *row) for row in TABLE for via in VIAS]
# DTensor operands take their layout from the placements: a vocab_start_index (on one rank) is refused
# on every rank, not ignored
CASES += [(via, *row) for via in ("dtensor", "dtensor-rows") for row in [
    ("one-vocab-start", "ce", {}, dict(vocab_start_index=0), ("ValueError", BAD)),
    ("one-lin-vocab-start", "linear", {}, dict(vocab_start_index=0), ("ValueError", BAD)),
]]


def _spawn(world: int, tmp: pathlib.Path) -> dict:
    specs = [dict(id=f"{via}-{cid}", seed=i,
                  calls=[dict(kind="opt_call", via=via, head=head, data=_data(head, i), opts=opts,
                              rank_opts={1: one})])
             for i, (via, cid, head, opts, one, _) in enumerate(CASES)]
    return run_group(WORKER, world, specs, tmp, SPAWN_TIMEOUT_S)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return cached_spawner(_spawn, tmp_path_factory, "opts")


def _torch_loss(z, y, opts: dict):
    """torch's cross_entropy of the transformed logits, plus the z-loss (reference of the options)."""
    z = z * opts.get("logit_scale", 1.0)
    if opts.get("softcap"):
        z = opts["softcap"] * torch.tanh(z / opts["softcap"])
    red = opts.get("reduction", "mean")
    loss = F.cross_entropy(z, y, reduction=red, label_smoothing=opts.get("label_smoothing", 0.0))
    zl = opts.get("lse_square_scale", 0.0)
    if zl:
        valid = y != -100
        rows = zl * torch.where(valid, torch.logsumexp(z, 1), 0.0) ** 2
        loss = loss + (rows if red == "none" else rows.sum() if red == "sum" else rows.sum() / valid.sum())
    return loss


def _torch(head: str, d: dict, opts: dict, dtype) -> dict:
    """Single-device torch in ``dtype``: the loss and the gradients of the upstream objective."""
    if head == "ce":
        x = d["x"].to(dtype).clone().requires_grad_()
        loss = _torch_loss(x, d["y"], opts)
        ops = dict(grad=x)
    else:
        h, W = d["h"].to(dtype).clone().requires_grad_(), d["W"].to(dtype).clone().requires_grad_()
        loss = _torch_loss(F.linear(h, W), d["y"], opts)
        ops = dict(dh=h, dW=W)
    obj = (loss * d["g"].to(dtype)).sum() if loss.dim() else loss * 0.7
    obj.backward()
    return dict(loss=loss.detach(), **{k: t.grad for k, t in ops.items()})


@pytest.mark.parametrize("via,cid,head,opts,one,expect",
                         [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in CASES])
def test_option_honoured_or_refused_alike(via, cid, head, opts, one, expect, results):
    outs = [o["calls"][0] for o in results(2)[f"{via}-{cid}"]]
    if expect != "ok":
        kind, msg = expect
        for r, o in enumerate(outs):
            assert "error" in o, f"rank {r} returned instead of raising {kind}"
            assert o["error"] == kind, f"rank {r}: {o['error']}: {o['message']}"
            assert "timed out" not in o["message"].lower(), o["message"]
            if not (one and r == 1 and msg == BAD):  # rank 1 raises its own reason
                assert msg in o["message"], f"rank {r}: {o['message']}"
        return
    for r, o in enumerate(outs):
        assert "error" not in o, f"rank {r}: {o['traceback']}"
        assert torch.equal(o["loss"], outs[0]["loss"]), "ranks disagree on the loss"
    d = _data(head, _seed(via, cid))
    kw = {k: v for k, v in opts.items() if k not in ("inplace_backward", "chunk_size", "grad_accum_dtype")}
    ref, theirs = _torch(head, d, kw, torch.float64), _torch(head, d, kw, torch.float32)
    o0 = outs[0]
    if head == "ce":
        grad = torch.cat([o["grad"] for o in outs], 1) if via == "pg" else o0["grad"]
        ours = dict(loss=o0["loss"], grad=grad)
        assert all(o["overwritten"] == bool(opts.get("inplace_backward")) for o in outs), \
            "inplace_backward not honoured: the logits' storage was (not) written over"
    else:
        ours = dict(loss=o0["loss"], dh=o0["dh"],
                    dW=torch.cat([o["dW"] for o in outs], 0) if via == "pg" else o0["dW"])
        for r, o in enumerate(outs):  # every vocabulary split of the backward got the caller's chunk_size
            assert o["splits"] and set(o["splits"]) == {opts.get("chunk_size")}, (r, o["splits"])
    for name in ours:
        assert_close_rule(f"{via}-{cid} {name}", ours[name], theirs[name], ref[name], torch.float32)


def _seed(via: str, cid: str) -> int:
    return next(i for i, c in enumerate(CASES) if c[0] == via and c[1] == cid)


# ------------------------------------------------------------------ single device, both CPU paths
@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """"triton": the kernels under the interpreter; "torch": the pure-torch path."""
    if request.param == "torch":
        for mod in (ce_ops, linear_ops, linear_chunked):
            monkeypatch.setattr(mod, "uses_triton", lambda x: False)
    return request.param


SINGLE_BAD = [
    ("chunk-neg", dict(chunk_size=-3), "chunk_size must be"),
    ("chunk-zero", dict(chunk_size=0), "chunk_size must be"),
    ("chunk-float", dict(chunk_size=2.0), "chunk_size must be"),
    ("accum-int", dict(grad_accum_dtype=3), "grad_accum_dtype must be"),
    ("accum-int64", dict(grad_accum_dtype=torch.int64), "grad_accum_dtype must be"),
    ("accum-other-float", dict(grad_accum_dtype=torch.float16), "grad_accum_dtype must be"),
]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("cid,kw,msg", [pytest.param(*c, id=c[0]) for c in SINGLE_BAD])
def test_single_device_chunking_options_raise(cid, kw, msg, reduction, path):
    """Both linear paths (token-chunked for mean, per-token for none) raise before any work."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 4, generator=g).requires_grad_()
    W = torch.randn(9, 4, generator=g)
    y = torch.randint(0, 9, (5,), generator=g)
    with pytest.raises(ValueError, match=msg):
        xent_triton.linear_cross_entropy(h, W, y, reduction=reduction, **kw)


# (id, options): the per-token linear backward (recompute by vocabulary splits)
PER_TOKEN = [
    ("none", dict(reduction="none")),
    ("lse", dict(return_lse=True, label_smoothing=0.1)),
]


@pytest.mark.parametrize("cid,kw", [pytest.param(*c, id=c[0]) for c in PER_TOKEN])
def test_per_token_backward_receives_chunk_size(cid, kw, path, monkeypatch):
    """``chunk_size`` reaches the per-token backward's vocabulary splits (its docstring's promise;
    it was dropped before) and the gradients over 3 splits stay the float64 truth's."""
    seen: list = []
    real = linear_chunked.split_cols

    def spy(N, C, x, chunk_size=None):
        seen.append(chunk_size)
        return real(N, C, x, chunk_size)

    monkeypatch.setattr(linear_chunked, "split_cols", spy)
    g = torch.Generator().manual_seed(5)
    C = 300  # chunk_size=1: splits of 128 classes -> 3 splits
    hs, Ws = torch.randn(7, 5, generator=g), torch.randn(C, 5, generator=g) / math.sqrt(5)
    y = torch.randint(0, C, (7,), generator=g)
    up = torch.rand(7, generator=g) + 0.5

    def run(fn, dtype):
        h, W = hs.to(dtype).clone().requires_grad_(), Ws.to(dtype).clone().requires_grad_()
        out = fn(h, W)
        loss, lse = out if isinstance(out, tuple) else (out, None)
        obj = (loss * up.to(dtype)).sum() if loss.dim() else loss * 0.7
        if lse is not None:
            obj = obj + (lse * up.to(dtype)).sum()
        obj.backward()
        return (loss.detach(), h.grad, W.grad)

    opts = {k: v for k, v in kw.items() if k != "return_lse"}

    def torch_fn(h, W):
        z = F.linear(h, W)
        loss = F.cross_entropy(z, y, **opts)
        return (loss, torch.logsumexp(z, 1)) if kw.get("return_lse") else loss

    ours = run(lambda h, W: xent_triton.linear_cross_entropy(h, W, y, chunk_size=1, **kw), torch.float32)
    assert seen == [1], seen
    ref, theirs = run(torch_fn, torch.float64), run(torch_fn, torch.float32)
    for name, a, t, r in zip(("loss", "dh", "dW"), ours, theirs, ref):
        assert_close_rule(name, a, t, r, torch.float32)
