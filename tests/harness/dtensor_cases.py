"""Calls of the spawned distributed worker that need a device mesh: DTensor heads, FSDP2, adapters.

Each function takes (call, groups, recorder) on one rank and returns plain tensors for the parent
(full tensors gathered with ``full_tensor()`` after the step, plus the placements seen).
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import xent_triton

_MESHES: dict = {}


def _mesh(shape: tuple):
    if shape not in _MESHES:
        _MESHES[shape] = init_device_mesh("cpu", shape)
    return _MESHES[shape]


def _pl(spec: list) -> list:
    """("S", d) -> Shard(d), "R" -> Replicate()."""
    return [Replicate() if p == "R" else Shard(p[1]) for p in spec]


def _leaf(t: torch.Tensor, mesh, spec) -> DTensor:
    return distribute_tensor(t.clone(), mesh, _pl(spec)).requires_grad_()


def _full(t):
    """A plain tensor for the objective (a DTensor loss / lse gathered, differentiably)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _out(t) -> dict:
    is_dt = isinstance(t, DTensor)
    return dict(value=t.full_tensor().detach() if is_dt else t.detach(),
                placements=[str(p) for p in t.placements] if is_dt else None)


def dtensor_ce(call: dict, groups: dict, rec) -> dict:
    """cross_entropy of DTensor logits placed by ``call["x_pl"]`` (target by ``y_pl`` or plain)."""
    mesh = _mesh(tuple(call["mesh"]))
    x = _leaf(call["x"], mesh, call["x_pl"])
    y = distribute_tensor(call["y"], mesh, _pl(call["y_pl"])) if call.get("y_pl") else call["y"]
    rec.active = True
    res = xent_triton.cross_entropy(x, y, **call.get("opts", {}))
    loss, lse = res if call.get("opts", {}).get("return_lse") else (res, None)
    fwd = rec.take()
    obj = (_full(loss) * call["g"]).sum()
    if lse is not None:
        obj = obj + (_full(lse) * call["h"]).sum()
    obj.backward()
    rec.active = False
    return dict(loss=_out(loss), lse=_out(lse) if lse is not None else None, grad=_out(x.grad),
                local_grad_shape=tuple(x.grad.to_local().shape), fwd=fwd, bwd=rec.take())


def dtensor_linear(call: dict, groups: dict, rec) -> dict:
    """linear_cross_entropy with hidden / weight (/ bias) DTensors placed as the call says."""
    mesh = _mesh(tuple(call["mesh"]))
    h = _leaf(call["h"], mesh, call["h_pl"]) if call["h_pl"] else call["h"].clone().requires_grad_()
    W = _leaf(call["W"], mesh, call["W_pl"])
    b = _leaf(call["b"], mesh, call["W_pl"]) if call.get("b") is not None else None
    y = distribute_tensor(call["y"], mesh, _pl(call["y_pl"])) if call.get("y_pl") else call["y"]
    rec.active = True
    loss = xent_triton.linear_cross_entropy(h, W, y, linear_bias=b, **call.get("opts", {}))
    fwd = rec.take()
    obj = (_full(loss) * call["g"]).sum()
    obj.backward()
    rec.active = False
    return dict(loss=_out(loss), dh=_out(h.grad), dW=_out(W.grad), db=_out(b.grad) if b is not None else None,
                fwd=fwd, bwd=rec.take())


KINDS = {"dtensor_ce": dtensor_ce, "dtensor_linear": dtensor_linear}



class TinyLM(torch.nn.Module):
    """Embedding -> Linear -> tanh -> FusedLMHead: the loss is computed inside the head's forward."""

    def __init__(self, V: int, D: int, C: int) -> None:
        super().__init__()
        from xent_triton.parallel import FusedLMHead
        self.emb = torch.nn.Embedding(V, D)
        self.proj = torch.nn.Linear(D, D)
        self.head = FusedLMHead(D, C, bias=True, ignore_index=-100)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(self.emb(tokens))), labels)


def fsdp2_step(call: dict, groups: dict, rec) -> dict:
    """One training step of ``fully_shard``-ed TinyLM on this rank's batch; gathered gradients."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(tuple(call["mesh"]))
    model = TinyLM(*call["dims"])
    model.load_state_dict(call["state"])
    fully_shard(model.head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    r = mesh.get_local_rank(0)
    loss = model(call["tokens"][r], call["labels"][r])
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    placements = {n: [str(q) for q in p.grad.placements] for n, p in model.named_parameters()}
    return dict(loss=loss.detach(), grads=grads, placements=placements)


def titan_loss(call: dict, groups: dict, rec) -> dict:
    """The torchtitan-style loss on (B, S, C) logits sharded Shard(-1) over the mesh."""
    from xent_triton.integrations.torchtitan import CrossEntropyLoss

    mesh = _mesh(tuple(call["mesh"]))
    pred = _leaf(call["pred"], mesh, [("S", -1)])
    rec.active = True
    loss, metrics = CrossEntropyLoss(label_smoothing=0.1)(pred, call["labels"], call["global_valid_tokens"])
    fwd = rec.take()
    loss.backward()
    rec.active = False
    return dict(loss=loss.detach(), is_dtensor=isinstance(loss, DTensor), grad=_out(pred.grad),
                metrics=metrics, fwd=fwd, bwd=rec.take())


KINDS.update(fsdp2=fsdp2_step, titan=titan_loss)
