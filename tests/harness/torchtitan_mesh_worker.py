"""One spawned rank of tests/integrations/test_torchtitan_mesh.py: xent's torchtitan loss on a
(dp, tp) 2-D mesh.

Usage: python torchtitan_mesh_worker.py RANK WORLD INIT_FILE CASES_FILE OUT_DIR

As torchtitan 0.3.0 produces them under loss parallel: the predictions are a DTensor on the "tp"
sub-mesh, sharded on the vocabulary (Shard(-1)); each data-parallel rank holds its own rows of the
global batch; labels are plain; ``global_valid_tokens`` counts the whole global batch.
"""
from __future__ import annotations

import datetime
import sys
import traceback

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from xent_triton.integrations.torchtitan import CrossEntropyLoss


def run(case: dict, mesh) -> dict:
    dp = mesh.get_local_rank("dp")
    rows = case["pred"].shape[0] // mesh.size(0)
    local_pred = case["pred"][dp * rows:(dp + 1) * rows]
    labels = case["labels"][dp * rows:(dp + 1) * rows]
    pred = distribute_tensor(local_pred, mesh["tp"], [Shard(-1)]).requires_grad_()
    loss_fn = CrossEntropyLoss(label_smoothing=case["label_smoothing"])
    loss, metrics = loss_fn(pred, labels, case["global_valid_tokens"], positions=case["positions"])
    (loss * case["upstream"]).backward()
    with torch.no_grad():
        val_sum, _ = loss_fn(pred, labels)  # the validator's call
    return dict(dp=dp, loss=loss.detach(), metrics=metrics, grad=pred.grad.full_tensor(), val_sum=val_sum,
                is_dtensor=type(loss).__name__ == "DTensor")


def main(rank: int, world: int, init_file: str, cases_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    results = {}
    for case in torch.load(cases_file, weights_only=False):
        try:
            results[case["id"]] = run(case, mesh)
        except Exception as e:  # every rank reports; the test shows the traceback
            results[case["id"]] = dict(error=repr(e), traceback=traceback.format_exc())
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
