"""One spawned rank of tests/kl/test_kl_linear_compaction_parallel.py: the class-sharded linear forms
(``kl/parallel_linear.py``) with ignored tokens, every case of the world in ONE gloo group
(``vocab_parallel_worker.main`` with this runner). Per case: outputs, the gradients of (hidden,
this rank's head rows, bias rows) and this rank's GEMM FLOPs (perf/traffic.py, forward + backward).

Usage: python kl_compaction_worker.py RANK WORLD INIT_FILE CASES_FILE OUT_DIR
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import xent_triton
from vocab_parallel_worker import main
from xent_triton.kl.parallel_linear import vocab_parallel_linear_token_logprobs


def run_case(case: dict, groups: dict, rec) -> dict:
    from harness import traffic

    r, d = dist.get_rank(), case["data"]
    start, size = sum(case["sizes"][:r]), case["sizes"][r]
    ids = case["rank_ids"].get(r, d["ids"])
    before = os.environ.get("XENT_COMPACT")
    os.environ["TRITON_INTERPRET"] = "0" if case["torch_path"] else case["interpret"]
    os.environ["XENT_COMPACT"] = case["rank_compact"].get(r, case["compact"])
    try:
        h = d["h"].clone().requires_grad_()
        w, b = (d[k][start:start + size].clone().requires_grad_() for k in ("w", "b"))
        group, kw = dist.group.WORLD, case["kw"]
        with traffic.count() as cnt:
            if case["fn"] == "logprobs":
                outs = list(vocab_parallel_linear_token_logprobs(
                    h, w, ids, b, kw["temperature"], True, group, ignore_index=kw["ignore_index"],
                    chunk_size=kw["chunk_size"]))
            else:
                outs = [xent_triton.linear_distillation_loss(
                    h, w, d["ht"], d["wt"][start:start + size], ids, linear_bias=b,
                    teacher_linear_bias=d["bt"][start:start + size], process_group=group, reduction="none",
                    **kw)]
            torch.autograd.backward(outs, [u.to(o.dtype) for o, u in zip(outs, d["ups"])])
        return {"outs": [o.detach() for o in outs], "grads": [h.grad, w.grad, b.grad], "flops": cnt["flops"]}
    finally:
        if before is None:
            os.environ.pop("XENT_COMPACT", None)
        else:
            os.environ["XENT_COMPACT"] = before


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], runner=run_case)
