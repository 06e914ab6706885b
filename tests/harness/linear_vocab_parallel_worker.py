"""One spawned rank of tests/linear/test_linear_vocab_parallel.py: runs every case of one world size in a
single gloo group and saves, per case, the loss, lse, gradients (input, this rank's weight and bias
shards), the collectives of each call (forward and backward apart) and, where asked, the FLOPs.

Usage: python linear_vocab_parallel_worker.py RANK WORLD INIT_FILE CASES_FILE OUT_DIR

The parent puts TRITON_INTERPRET=1 (CPU) in the environment before triton is imported here. The
collective recorder is the core TP harness's (vocab_parallel_worker.Recorder).
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist

import xent_triton
from harness import traffic
from vocab_parallel_worker import Recorder
from vocab_parallel_worker import main as serve
from xent_triton.core import launch


def run_case(case: dict, groups: dict, rec: Recorder) -> dict:
    members = next(m for m in case["groups"] if dist.get_rank() in m)
    gi = case["groups"].index(members)
    group = groups[tuple(members)]
    r = members.index(dist.get_rank())
    d = case["data"][gi]
    start, size = case["real_starts"][r], case["sizes"][r]
    need_x, need_w, need_b = case["need"]
    opts = dict(case["opts"])
    extra = {"vocab_start_index": case["starts"][r]} if case["starts"] else {}
    os.environ["TRITON_INTERPRET"] = "0" if case["torch_path"] else case["interpret"]

    def fn(x, w, b, y):
        # through the public entry point, which dispatches to linear_parallel under a process group
        return xent_triton.linear_cross_entropy(x, w, y, linear_bias=b, weight=d["weight"],
                                                process_group=group, **opts, **extra)
    if case["compile"]:  # a graph break around the vocab-parallel call
        fn = torch.compile(fn, backend="aot_eager")
    out: dict = {"group_index": gi, "group_rank": r, "calls": []}
    for _ in range(case["repeat"]):
        leaf = x = d["x"].clone().requires_grad_(need_x)
        y = d["target"]
        if case["layout"] == "strided":  # x: a column slice of a wider tensor; y: every other id
            leaf = torch.cat([d["x"], d["x"]], 1).requires_grad_(need_x)
            x, y = leaf[:, :d["x"].shape[1]], torch.stack([y, y], 1)[:, 0]
        elif case["layout"] == "3d":  # (2, N/2, D) hidden states, (2, N/2) targets
            x, y = leaf.view(2, -1, leaf.shape[1]), y.view(2, -1)
        w = d["W"][start:start + size].clone().requires_grad_(need_w)
        b = d["b"][start:start + size].clone().requires_grad_(need_b) if d["b"] is not None else None
        rec.active = True
        tiles = launch.overrides(**case["tiles"]) if case["tiles"] else contextlib.nullcontext()
        counting = traffic.count() if case["flops"] else contextlib.nullcontext({})
        with tiles, counting as counted:  # small class tiles / several class splits, forward and backward
            res = fn(x, w, b, y)
            fwd = rec.take()
            loss, lse = res if opts.get("return_lse") else (res, None)
            tensors, grads = [loss], [d["g"].to(loss.dtype).view(loss.shape)]
            if lse is not None and d["h"] is not None:
                tensors.append(lse)
                grads.append(d["h"].to(lse.dtype).view(lse.shape))
            torch.autograd.backward(tensors, grads)
        bwd = rec.take()
        rec.active = False
        out["calls"].append({"fwd": fwd, "bwd": bwd})
        out["flops"] = counted.get("flops")  # aten GEMMs + interpreted tl.dot, forward + backward
        dx = None if leaf.grad is None else leaf.grad[:, :d["x"].shape[1]]
        out.update(loss=loss.detach().reshape(-1 if loss.dim() else ()),
                   lse=None if lse is None else lse.detach().reshape(-1), dx=dx,
                   dw=w.grad, db=None if b is None else b.grad)
    return out


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], run_case)
