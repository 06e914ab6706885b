"""One spawned rank of tests/kl/test_kl_vocab_parallel.py: every case of one world size in ONE gloo
group (``vocab_parallel_worker.main`` with this runner); collectives recorded per call.

Usage: python kl_vocab_parallel_worker.py RANK WORLD INIT_FILE CASES_FILE OUT_DIR
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import xent_triton
import xent_triton.kl.parallel_distill
from vocab_parallel_worker import Recorder, main

xent_triton.kl.parallel_distill.TERMS_BLOCK = 16  # the jsd terms in several row blocks per case


def run_memory(case: dict) -> dict:
    """Peak extra bytes of one forward + backward on this rank's shard (``traffic.peak_extra_bytes``,
    after a warm-up step and a gc): (N, C_local) fp32 logits or a (C_local, D) head shard."""
    import gc

    from harness import traffic

    N, C, D, fn = case["N"], case["C_local"], case["D"], case["fn"]
    group = dict(process_group=dist.group.WORLD)
    own = torch.Generator().manual_seed(100 + dist.get_rank())  # this rank's shard
    ids = torch.randint(0, C * dist.get_world_size(), (N,), generator=torch.Generator().manual_seed(5))
    if fn.startswith("linear"):
        h = torch.randn(N, D, generator=own).requires_grad_()
        w = (torch.randn(C, D, generator=own) / 4).requires_grad_()
        ht, wt = torch.randn(N, D, generator=own), torch.randn(C, D, generator=own) / 4
        leaves = (h, w)
    else:
        x = (3 * torch.randn(N, C, generator=own)).requires_grad_()
        t = 3 * torch.randn(N, C, generator=own)
        leaves = (x,)

    def step() -> None:
        if fn == "logprobs":
            outs = xent_triton.token_logprobs(x, ids, **group, **case["opts"])
        elif fn == "distill":
            outs = xent_triton.distillation_loss(x, t, ids, **group, **case["opts"])
        elif fn == "linear_logprobs":
            outs = xent_triton.linear_token_logprobs(h, w, ids, **group, **case["opts"])
        else:
            outs = xent_triton.linear_distillation_loss(h, w, ht, wt, ids, **group, **case["opts"])
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward([o.sum() * 0.5 for o in outs])
        for leaf in leaves:
            leaf.grad = None

    step()
    gc.collect()
    return {"peak": traffic.peak_extra_bytes(step)}


def run_case(case: dict, groups: dict, rec: Recorder) -> dict:
    if "C_local" in case:
        return run_memory(case)
    r, d = dist.get_rank(), case["data"]
    sizes = case["sizes"]
    start = sum(sizes[:r])
    opts = dict(case["opts"], **case["rank_opts"].get(r, {}))
    os.environ["TRITON_INTERPRET"] = "0" if case["torch_path"] else case["interpret"]
    if case["mesh"]:
        return run_mesh(case, d, opts)
    if case["fn"].startswith("linear"):
        return run_linear(case, d, opts, start, sizes[r], rec, case["teacher_trim"].get(r, 0))
    if case["dtensor"]:
        return run_dtensor(case, d, opts, rec)
    x = d["x"][..., start:start + sizes[r]].contiguous()
    leaf = x.clone().requires_grad_()
    rec.active = True
    if case["module"]:  # the module forms, built with the same options
        group = dist.group.WORLD
        if case["fn"] == "logprobs":
            res = xent_triton.TokenLogprobs(process_group=group, **opts)(leaf, d["ids"])
        else:
            t = d["t"][..., start:start + sizes[r]].contiguous()
            res = xent_triton.DistillationLoss(process_group=group, **opts)(leaf, t, d["ids"])
        outs = res if isinstance(res, tuple) else (res,)
    elif case["fn"] == "logprobs":
        res = xent_triton.token_logprobs(leaf, d["ids"], process_group=dist.group.WORLD, **opts)
        outs = res if isinstance(res, tuple) else (res,)
    else:
        width = sizes[r] - case["teacher_trim"].get(r, 0)
        t = d["t"][..., start:start + width].contiguous()
        outs = (xent_triton.distillation_loss(leaf, t, d["ids"], process_group=dist.group.WORLD, **opts),)
    fwd = rec.take()
    torch.autograd.backward(list(outs), [u.to(o.dtype) for o, u in zip(outs, d["ups"])])
    bwd = rec.take()
    rec.active = False
    return {"outs": [o.detach() for o in outs], "grad": leaf.grad, "fwd": fwd, "bwd": bwd}


def run_dtensor(case: dict, d: dict, opts: dict, rec: Recorder) -> dict:
    """Logits (and teacher) distributed ``Shard(-1)`` on a 1-D mesh (the torch.chunk layout)."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    leaf = distribute_tensor(d["x"].clone(), mesh, [Shard(-1)]).requires_grad_()
    t = distribute_tensor(d["t"].clone(), mesh, [Shard(-1)])
    rec.active = True
    if case["fn"] == "logprobs":
        res = xent_triton.token_logprobs(leaf, d["ids"], **opts)
        outs = res if isinstance(res, tuple) else (res,)
    else:
        outs = (xent_triton.distillation_loss(leaf, t, d["ids"], **opts),)
    fwd = rec.take()
    torch.autograd.backward([o.to_local() for o in outs], [u.to(o.dtype) for o, u in zip(outs, d["ups"])])
    bwd = rec.take()
    rec.active = False
    return {"outs": [o.to_local().detach() for o in outs], "grad": leaf.grad.to_local(), "fwd": fwd,
            "bwd": bwd, "placements": [str(o.placements) for o in outs]}


def placed(full: torch.Tensor, mesh, shard: bool, grad: bool = False) -> DTensor:
    """``full`` as a DTensor on a 1-D mesh: ``Shard(0)`` in the torch.chunk layout, or Replicate."""
    pl, local = ([Shard(0)], None) if shard else ([Replicate()], full)
    if shard:  # torch.chunk's rows of this rank (none past the last chunk)
        step = -(-full.shape[0] // mesh.size())
        lo = min(full.shape[0], mesh.get_local_rank() * step)
        local = full[lo:min(full.shape[0], lo + step)]
    t = DTensor.from_local(local.clone(), mesh, pl, shape=full.shape, stride=full.stride())
    return t.requires_grad_() if grad else t


def dtensor_heads(d: dict, trim: int) -> dict:
    """The linear forms' operands as DTensors (hidden Replicate, heads Shard(0)); ``trim`` > 0:
    this rank's teacher head is Replicate (a layout mismatch on one rank)."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return dict(h=placed(d["h"], mesh, False, True), w=placed(d["w"], mesh, True, True),
                b=placed(d["b"], mesh, True, True), ht=placed(d["ht"], mesh, False),
                wt=placed(d["wt"], mesh, not trim, True), bt=placed(d["bt"], mesh, not trim))


PLACE = {"S": Shard(0), "C": Shard(-1), "R": Replicate()}


def run_mesh(case: dict, d: dict, opts: dict) -> dict:
    """The KL family on a mesh of ``case["mesh"]``: logits / hidden states / heads placed per mesh dim
    (``h_pl`` / ``w_pl``: "S" = Shard(0), "C" = Shard(-1), "R" = Replicate); the full outputs and
    the full gradients."""
    mesh = init_device_mesh("cpu", tuple(case["mesh"]))

    def put(full: torch.Tensor, pls, grad: bool = False) -> DTensor:
        t = distribute_tensor(full.clone(), mesh, [PLACE[p] for p in pls])
        return t.requires_grad_() if grad else t

    ids, tokens_pl = d["ids"], [Shard(0) if p == "S" else Replicate() for p in case["h_pl"]]
    if ids is not None and "S" in case["h_pl"]:  # this rank's tokens (the hidden states' local rows)
        ids = distribute_tensor(ids, mesh, tokens_pl)
    if "token_weight" in opts:  # a DTensor placed as the tokens
        opts = dict(opts, token_weight=distribute_tensor(opts["token_weight"], mesh, tokens_pl))
    if not case["fn"].startswith("linear"):  # logits (and teacher) placed by h_pl
        x, t = put(d["x"], case["h_pl"], True), put(d["t"], case["h_pl"])
        if case["fn"] == "logprobs":
            res = xent_triton.token_logprobs(x, ids, **opts)
            outs = res if isinstance(res, tuple) else (res,)
        else:
            outs = (xent_triton.distillation_loss(x, t, ids, **opts),)
        leaves, teacher = [x], t
    else:
        h, w = put(d["h"], case["h_pl"], True), put(d["w"], case["w_pl"], True)
        b = put(d["b"], case["w_pl"], True)
        ht, wt, bt = put(d["ht"], case["h_pl"]), put(d["wt"], case["w_pl"], True), put(d["bt"], case["w_pl"])
        if case["fn"] == "linear_logprobs":
            res = xent_triton.linear_token_logprobs(h, w, ids, linear_bias=b, **opts)
            outs = res if isinstance(res, tuple) else (res,)
        else:
            outs = (xent_triton.linear_distillation_loss(h, w, ht, wt, ids, linear_bias=b,
                                                         teacher_linear_bias=bt, **opts),)
        leaves, teacher = [h, w, b], wt
    ups = [u.to(o.dtype) if u.dim() == 0 else distribute_tensor(u, mesh, o.placements).to_local()
           for o, u in zip(outs, d["ups"])]
    torch.autograd.backward([o.to_local() for o in outs], ups)
    return {"outs": [o.full_tensor().detach() for o in outs],
            "grads": [leaf.grad.full_tensor() for leaf in leaves], "teacher_grad": teacher.grad}


def run_linear(case: dict, d: dict, opts: dict, start: int, size: int, rec: Recorder, trim: int) -> dict:
    """The linear forms: this rank's head rows; hidden states (and their gradient) are replicated.
    DTensor cases: every operand a DTensor (``dtensor_heads``); the teacher head requires grad and
    must get none (the teacher is a constant)."""
    if case["dtensor"]:
        ops = dtensor_heads(d, trim)
        h, w, b, ht, wt, bt = (ops[k] for k in ("h", "w", "b", "ht", "wt", "bt"))
        group = {}
    else:
        h = d["h"].clone().requires_grad_()
        w = d["w"][start:start + size].clone().requires_grad_()
        b = d["b"][start:start + size].clone().requires_grad_()
        ht, wt, bt = d["ht"], d["wt"][start:start + size - trim], d["bt"][start:start + size - trim]
        group = dict(process_group=dist.group.WORLD)
    rec.active = True
    if case["fn"] == "linear_logprobs":
        if case["module"]:
            res = xent_triton.LinearTokenLogprobs(**group, **opts)(h, w, d["ids"], b)
        else:
            res = xent_triton.linear_token_logprobs(h, w, d["ids"], linear_bias=b, **group, **opts)
        outs = res if isinstance(res, tuple) else (res,)
    else:
        if case["module"]:
            crit = xent_triton.LinearDistillationLoss(**group, **opts)
            outs = (crit(h, w, ht, wt, d["ids"], b, bt),)
        else:
            outs = (xent_triton.linear_distillation_loss(h, w, ht, wt, d["ids"], linear_bias=b,
                                                         teacher_linear_bias=bt, **group, **opts),)
    fwd = rec.take()
    local = [o.to_local() if isinstance(o, DTensor) else o for o in outs]
    torch.autograd.backward(local, [u.to(o.dtype) for o, u in zip(local, d["ups"])])
    bwd = rec.take()
    rec.active = False
    grads = [t.grad.to_local() if isinstance(t, DTensor) else t.grad for t in (h, w, b)]
    out = {"outs": [o.detach() for o in local], "grad": grads[0], "dw": grads[1], "db": grads[2], "fwd": fwd,
           "bwd": bwd}
    if case["dtensor"]:
        out["placements"] = [str(o.placements) for o in outs]
        out["teacher_grad"] = wt.grad
    return out


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], runner=run_case)
