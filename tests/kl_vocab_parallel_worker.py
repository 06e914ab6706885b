"""One spawned rank of tests/test_kl_vocab_parallel.py: every case of one world size in ONE gloo
group (``vocab_parallel_worker.main`` with this runner); collectives recorded per call.

Usage: python kl_vocab_parallel_worker.py RANK WORLD INIT_FILE CASES_FILE OUT_DIR
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import xent_triton
from vocab_parallel_worker import Recorder, main


def run_case(case: dict, groups: dict, rec: Recorder) -> dict:
    r, d = dist.get_rank(), case["data"]
    sizes = case["sizes"]
    start = sum(sizes[:r])
    opts = dict(case["opts"], **case["rank_opts"].get(r, {}))
    os.environ["TRITON_INTERPRET"] = "0" if case["torch_path"] else case["interpret"]
    x = d["x"][..., start:start + sizes[r]].contiguous()
    leaf = x.clone().requires_grad_()
    rec.active = True
    if case["fn"] == "logprobs":
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


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], runner=run_case)
