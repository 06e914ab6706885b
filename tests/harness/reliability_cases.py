"""Calls of the spawned distributed worker for issue 18 (items 1 and 4): a second derivative
through the vocabulary-parallel / DTensor linear head (must raise the documented error on every
rank), and a probability target that requires grad (a trainable teacher) under a process group
or as a DTensor (its gradient must be the single device's). Each returns plain tensors.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

import xent_triton
from dtensor_cases import _leaf, _mesh, _pl


def _shard(sizes: list, r: int) -> slice:
    return slice(sum(sizes[:r]), sum(sizes[:r + 1]))


def hvp(call: dict, groups: dict, rec) -> dict:
    """Hessian-vector product w.r.t. the hidden states of linear_cross_entropy, the weight frozen:
    ``via`` "pg" (process_group, this rank's rows of W) or "dtensor" (W Shard(0), h Replicate)."""
    d, r = call["data"], dist.get_rank()
    if call["via"] == "pg":
        h = d["h"].clone().requires_grad_()
        W = d["W"][_shard(d["sizes"], r)].clone()
        loss = xent_triton.linear_cross_entropy(h, W, d["y"], process_group=dist.group.WORLD, **call["opts"])
    else:
        mesh = _mesh((dist.get_world_size(),))
        h = _leaf(d["h"], mesh, ["R"])
        W = distribute_tensor(d["W"].clone(), mesh, _pl([("S", 0)]))
        loss = xent_triton.linear_cross_entropy(h, W, d["y"], **call["opts"]).full_tensor()
    (g,) = torch.autograd.grad(loss.sum() * 0.7, h, create_graph=True)
    v = torch.ones_like(g) * 0.3
    (hv,) = torch.autograd.grad((g * v).sum(), h, allow_unused=True, materialize_grads=True)
    return dict(hv=hv.full_tensor() if isinstance(hv, DTensor) else hv)


def soft(call: dict, groups: dict, rec) -> dict:
    """cross_entropy of vocabulary-sharded logits with a probability target that requires grad:
    ``via`` "pg" (this rank's columns of both) or "dtensor" (both Shard(1)). Returns the loss and
    the full gradients of the logits and of the target."""
    d, r = call["data"], dist.get_rank()
    if call["via"] == "pg":
        cols = _shard(d["sizes"], r)
        x = d["x"][:, cols].clone().requires_grad_()
        p = d["p"][:, cols].clone().requires_grad_()
        loss = xent_triton.cross_entropy(x, p, process_group=dist.group.WORLD, **call["opts"])
        (loss * d["g"]).sum().backward()
        return dict(loss=loss.detach(), grad=x.grad, tgrad=p.grad)
    mesh = _mesh((dist.get_world_size(),))
    x, p = _leaf(d["x"], mesh, [("S", 1)]), _leaf(d["p"], mesh, [("S", 1)])
    loss = xent_triton.cross_entropy(x, p, **call["opts"])
    (loss.full_tensor() * d["g"]).sum().backward()
    return dict(loss=loss.full_tensor().detach(), grad=x.grad.full_tensor(), tgrad=p.grad.full_tensor())


def dtensor_options(call: dict, groups: dict, rec) -> dict:
    """A DTensor head on a vocabulary-parallel mesh with per-rank extra options (``rank_opts``):
    cross_entropy of Shard(1) logits, or the linear head with a Shard(0) weight."""
    mesh, me = _mesh((dist.get_world_size(),)), dist.get_rank()
    d, opts = call["data"], call.get("rank_opts", {}).get(me, {})
    if call["head"] == "ce":
        loss = xent_triton.cross_entropy(_leaf(d["x"], mesh, [("S", 1)]), d["y"], **opts)
    else:
        W = _leaf(d["W"], mesh, [("S", 0)])
        loss = xent_triton.linear_cross_entropy(_leaf(d["h"], mesh, ["R"]), W, d["y"], **opts)
    return dict(loss=loss.full_tensor().detach())


KINDS = {"hvp": hvp, "soft": soft, "dtensor_options": dtensor_options}
