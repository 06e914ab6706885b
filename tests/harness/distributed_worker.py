"""One spawned rank of the distributed scenario tests (hangs, DTensor, FSDP2, adapters): runs every
case of one world size in a single gloo group and saves, per case, what the case function returned
(or the error it raised). Cases name their function by ``kind``; each is a sequence of calls.

Usage: python distributed_worker.py RANK WORLD INIT_FILE CASES_FILE OUT_DIR

gloo's collective timeout is 90 s (ranks drift apart on a loaded machine: the interpreter is slow):
a rank stuck in a collective the others never enter raises there instead of hanging the group
until the parent's deadline.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

import xent_triton
from vocab_parallel_worker import Recorder

COLLECTIVE_TIMEOUT_S = 90


def _error(e: BaseException) -> dict:
    return {"error": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}


def _group(sets: list, gi: int, groups: dict):
    """(process group, group rank) of subgroup ``gi``; every subgroup of ``sets`` is created by
    every rank in the same order (``new_group`` is collective)."""
    for m in sets:
        if m is not None and tuple(m) not in groups:
            groups[tuple(m)] = dist.new_group(list(m))
    if sets[gi] is None:
        return dist.group.WORLD, dist.get_rank()
    return groups[tuple(sets[gi])], sets[gi].index(dist.get_rank())


def plain_call(call: dict, groups: dict, rec: Recorder) -> dict:
    """One vocab-parallel call with a process group: cross_entropy ("ce") or the linear head."""
    me = dist.get_rank()
    sets = call.get("groups") or [None]
    gi = next(i for i, m in enumerate(sets) if m is None or me in m)
    group, r = _group(sets, gi, groups)
    d = call["data"][gi]
    sizes = d["sizes"]
    start, size = sum(sizes[:r]), sizes[r]
    opts = dict(call.get("opts", {}), **call.get("rank_opts", {}).get(me, {}))
    tweak = call.get("rank_tweak", {}).get(me)
    rec.active = True
    if call["head"] == "ce":
        x = d["x"][:, start:start + size].clone().requires_grad_()
        loss = xent_triton.cross_entropy(x, d["y"], process_group=group, **opts)
        loss.backward()
        out = {"grad": x.grad}
    else:
        h = d["h"].clone().requires_grad_(tweak != "no_grad")
        W = d["W"][start:start + size].clone()
        if tweak == "bf16":
            W = W.bfloat16()
        W.requires_grad_()
        loss = xent_triton.linear_cross_entropy(h, W, d["y"], process_group=group, **opts)
        loss.backward()
        out = {"dW": W.grad, "dh": h.grad}
    rec.active = False
    out.update(loss=loss.detach(), group_index=gi, group_rank=r, comms=rec.take())
    return out


def run_calls(case: dict, groups: dict, rec: Recorder) -> dict:
    """A case = a sequence of calls; each call's result or error is kept, and the next call runs
    (the group must stay usable after an error raised on every rank)."""
    outs = []
    for call in case["calls"]:
        try:
            outs.append(KINDS[call.get("kind", "plain")](call, groups, rec))
        except Exception as e:  # recorded; the parent decides whether it was expected
            rec.active = False
            rec.take()
            outs.append(_error(e))
    return {"calls": outs}


def _kinds() -> dict:
    kinds = {"plain": plain_call}
    from dtensor_cases import KINDS as DT  # DTensor / FSDP2 / adapter calls (need the mesh)
    from options_cases import KINDS as OPT  # issue 17: every option on every path, or refused alike
    from reliability_cases import KINDS as REL  # issue 18: second derivatives, soft-target gradients
    kinds.update(DT)
    kinds.update(REL)
    kinds.update(OPT)
    return kinds


KINDS: dict = {}


def main(rank: int, world: int, init_file: str, cases_file: str, out_dir: str) -> None:
    t0 = time.time()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    print(f"rank {rank} init {time.time() - t0:.2f}s", flush=True)
    KINDS.update(_kinds())
    cases = torch.load(cases_file, weights_only=False)
    rec, groups, results = Recorder(), {}, {}
    for case in cases:
        t0 = time.time()
        torch.manual_seed(case.get("seed", 0))
        try:
            results[case["id"]] = run_calls(case, groups, rec)
        except Exception as e:
            results[case["id"]] = _error(e)
        print(f"rank {rank} {case['id']} {time.time() - t0:.2f}s", flush=True)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
