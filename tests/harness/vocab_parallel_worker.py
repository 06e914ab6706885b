"""One spawned rank of tests/cross_entropy/test_vocab_parallel.py: runs every case of one world size
in a single gloo group (one process start per world size, not per case) and saves what each case produced.

Usage: python vocab_parallel_worker.py RANK WORLD INIT_FILE CASES_FILE OUT_DIR

The parent puts TRITON_INTERPRET=1 (CPU) in the environment, so it is set before triton is
imported here. Every torch.distributed collective is wrapped to record (name, reduce op, bytes)
while a case runs, separately for forward and backward.
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

WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
           "reduce_scatter_tensor", "broadcast", "all_to_all", "all_to_all_single", "reduce",
           "gather", "scatter", "all_gather_object", "broadcast_object_list", "barrier")


class Recorder:
    """Wraps the torch.distributed collectives (module attributes) and logs calls when active."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, int]] = []
        self.active = False
        for name in WRAPPED:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            if self.active:
                t = args[1] if name == "all_gather" else (args[0] if args else None)
                nbytes = t.numel() * t.element_size() if isinstance(t, torch.Tensor) else -1
                op = kwargs.get("op", args[1] if name == "all_reduce" and len(args) > 1 else None)
                summed = op is not None or name == "all_reduce"
                label = "max" if op == dist.ReduceOp.MAX else ("sum" if summed else "")
                self.log.append((name, label, nbytes))
            return fn(*args, **kwargs)
        return wrapper

    def take(self) -> list:
        out, self.log = self.log, []
        return out


def shard_of(full: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """Class columns [start, start + size) of the full logits (class dim 1, or 0 for 1-D)."""
    return full.narrow(0 if full.dim() == 1 else 1, start, size).contiguous()


def run_case(case: dict, groups: dict, rec: Recorder) -> dict:
    members = next(m for m in case["groups"] if dist.get_rank() in m)
    gi = case["groups"].index(members)
    group = groups[tuple(members)]
    r = members.index(dist.get_rank())
    data = case["data"][gi]
    sizes = case["sizes"]
    given = case["starts"] or [None] * len(sizes)
    starts = [s if s is not None else sum(sizes[:i]) for i, s in enumerate(given)]
    x = shard_of(data["x"], starts[r], sizes[r])
    tgt = data["target"]
    if tgt.is_floating_point():
        tgt = shard_of(tgt, starts[r], sizes[r])
    opts = dict(case["opts"])
    extra = {"vocab_start_index": case["starts"][r]} if case["starts"] else {}
    os.environ["TRITON_INTERPRET"] = "0" if case["torch_path"] else case["interpret"]
    out: dict = {"group_index": gi, "group_rank": r, "calls": []}
    for _ in range(case["repeat"]):
        leaf = x.clone().requires_grad_()
        inp = leaf.clone() if opts.get("inplace_backward") else leaf
        rec.active = True
        if case["module"]:
            fn = xent_triton.CrossEntropyLoss(data["weight"], process_group=group, **opts, **extra)
        else:
            def fn(inp, tgt):
                return xent_triton.cross_entropy(inp, tgt, data["weight"], process_group=group, **opts,
                                                 **extra)
        if case["compile"]:  # a graph break around the vocab-parallel call
            fn = torch.compile(fn, backend="aot_eager")
        res = fn(inp, tgt)
        fwd = rec.take()
        loss, lse = res if opts.get("return_lse") else (res, None)
        tensors, grads = [loss], [data["g"]]
        if lse is not None and data["h"] is not None:
            tensors.append(lse)
            grads.append(data["h"])
        torch.autograd.backward(tensors, grads)
        bwd = rec.take()
        rec.active = False
        out["calls"].append({"fwd": fwd, "bwd": bwd})
        out.update(loss=loss.detach(), lse=None if lse is None else lse.detach(), grad=leaf.grad,
                   inplace_ok=(not opts.get("inplace_backward")) or torch.equal(
                       inp.detach().nan_to_num(7.0), leaf.grad.nan_to_num(7.0)))
    return out


def init_group_and_cases(rank: int, world: int, init_file: str, cases_file: str) -> tuple[list, dict]:
    """Join the gloo group, load the cases, and create every TP subgroup they name (same order on
    every rank): (cases, {member tuple: process group})."""
    t0 = time.time()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    print(f"rank {rank} init {time.time() - t0:.2f}s", flush=True)
    cases = torch.load(cases_file, weights_only=False)
    groups = {tuple(range(world)): dist.group.WORLD}
    for case in cases:
        for members in case["groups"]:
            if tuple(members) not in groups:
                groups[tuple(members)] = dist.new_group(list(members))
    return cases, groups


def main(rank: int, world: int, init_file: str, cases_file: str, out_dir: str, runner=None) -> None:
    """Run every case (``runner``: this module's ``run_case`` unless given) and save the results."""
    runner = run_case if runner is None else runner
    cases, groups = init_group_and_cases(rank, world, init_file, cases_file)
    rec = Recorder()
    interpret = os.environ.get("TRITON_INTERPRET", "0")
    results = {}
    for case in cases:
        case["interpret"] = interpret
        t0 = time.time()
        try:
            results[case["id"]] = runner(case, groups, rec)
        except Exception as e:  # recorded; the parent decides whether it was expected
            rec.active = False
            rec.take()
            results[case["id"]] = {"error": type(e).__name__, "message": str(e),
                                   "traceback": traceback.format_exc()}
        os.environ["TRITON_INTERPRET"] = interpret
        print(f"rank {rank} {case['id']} {time.time() - t0:.2f}s", flush=True)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
