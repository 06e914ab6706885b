"""Calls of the spawned distributed worker for issue 17 item 4 (every option honoured on every
path or refused alike): one vocabulary-parallel call of ``cross_entropy`` ("ce") or
``linear_cross_entropy`` ("linear") with a process group ("pg"), DTensors sharded on the classes
("dtensor") or DTensors sharded on the rows only ("dtensor-rows": no vocabulary parallelism), the
options of ``call["opts"]`` plus this rank's ``call["rank_opts"]``. Returns full tensors (DTensor)
or this rank's shard (pg: the parent concatenates), the ``chunk_size`` each vocabulary-split
backward received, and whether an ``inplace_backward`` call wrote over the logits' storage.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import xent_triton
from dtensor_cases import _leaf, _mesh
from xent_triton.linear import chunked


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _target(y, rows: bool, world: int):
    """The targets: sharded like the rows of a row-sharded DTensor input, else plain."""
    return distribute_tensor(y, _mesh((world,)), [Shard(0)]) if rows else y


def _objective(loss, d: dict):
    loss = _full(loss)
    return (loss * d["g"]).sum() if loss.dim() else loss * 0.7


def opt_call(call: dict, groups: dict, rec) -> dict:
    me, world = dist.get_rank(), dist.get_world_size()
    d = call["data"]
    opts = dict(call.get("opts", {}), **call.get("rank_opts", {}).get(me, {}))
    sl = slice(sum(d["sizes"][:me]), sum(d["sizes"][:me + 1]))
    pg, rows = call["via"] == "pg", call["via"] == "dtensor-rows"
    splits: list = []
    real = chunked.split_cols

    def spy(N, C, x, chunk_size=None):  # the chunk_size the per-token backward received
        splits.append(chunk_size)
        return real(N, C, x, chunk_size)

    chunked.split_cols = spy
    try:
        if call["head"] == "ce":
            if pg:
                leaf = d["x"][:, sl].clone().requires_grad_()
                kw = dict(process_group=dist.group.WORLD)
            else:
                leaf, kw = _leaf(d["x"], _mesh((world,)), [("S", 0 if rows else 1)]), {}
            x = leaf * 1.0  # not a leaf: inplace_backward may write over it
            loss = xent_triton.cross_entropy(x, _target(d["y"], rows, world), **kw, **opts)
            with torch.no_grad():
                before = _local(x).clone()
            _objective(loss, d).backward()
            with torch.no_grad():
                overwritten = not torch.equal(_local(x), before)
            return dict(loss=_full(loss).detach(), grad=_full(leaf.grad), overwritten=overwritten,
                        splits=splits)
        if pg:
            h = d["h"].clone().requires_grad_()
            W = d["W"][sl].clone().requires_grad_()
            loss = xent_triton.linear_cross_entropy(h, W, d["y"], process_group=dist.group.WORLD, **opts)
        else:
            mesh = _mesh((world,))
            h_pl, W_pl = ([("S", 0)], ["R"]) if rows else (["R"], [("S", 0)])
            h, W = _leaf(d["h"], mesh, h_pl), _leaf(d["W"], mesh, W_pl)
            loss = xent_triton.linear_cross_entropy(h, W, _target(d["y"], rows, world), **opts)
        _objective(loss, d).backward()
        return dict(loss=_full(loss).detach(), dW=_full(W.grad), dh=_full(h.grad), splits=splits)
    finally:
        chunked.split_cols = real


KINDS = {"opt_call": opt_call}
