"""xent's torchtitan loss on a (data, tensor) 2-D mesh at world 4 (gloo, CPU): predictions a DTensor
on the "tp" sub-mesh sharded on the vocabulary, rows split over "dp" (issue 19 item 1).

Every rank: loss = its data-parallel rows' token SUM / global_valid_tokens; ``local_loss_sum`` and
``local_valid_tokens`` over those same rows (loss * global_valid_tokens == local_loss_sum); the
validator's call returns that SUM; the losses of the dp ranks add up to the global token mean; the
gradient of each dp rank's rows against float64, with the tolerance rule.
"""
from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F

from spawn_group import run_group
from tolerances import assert_close_rule

WORKER = pathlib.Path(__file__).resolve().parents[1] / "harness" / "torchtitan_mesh_worker.py"


def _case():
    g = torch.Generator().manual_seed(11)
    pred = torch.randn(4, 5, 37, generator=g) * 2  # global batch 4 rows: 2 per dp rank; C = 37 on tp 2
    labels = torch.randint(0, 37, (4, 5), generator=g)
    labels[0, :3] = -100
    labels[3] = -100  # dp rank 1 has one fully masked row
    n = int((labels != -100).sum())
    return dict(id="w4-dp2-tp2-C37", pred=pred, labels=labels, global_valid_tokens=torch.tensor(n),
                positions=torch.arange(5).expand(2, 5), label_smoothing=0.1, upstream=1.3)


def _ref(pred, labels, dtype, smoothing, gvt):
    x = pred.to(dtype).clone().requires_grad_()
    s = F.cross_entropy(x.flatten(0, 1), labels.flatten(), reduction="sum", label_smoothing=smoothing)
    return s, x


def test_two_d_mesh_world4_losses_metrics_and_gradients(tmp_path):
    case = _case()
    outs = run_group(WORKER, 4, [case], tmp_path, timeout_s=240)[case["id"]]
    gvt = case["global_valid_tokens"]
    total = 0.0
    for r, o in enumerate(outs):
        assert "error" not in o, f"rank {r}: {o.get('traceback')}"
        rows = slice(2 * o["dp"], 2 * o["dp"] + 2)
        pred, labels = case["pred"][rows], case["labels"][rows]
        refs = {dt: _ref(pred, labels, dt, 0.1, gvt) for dt in (torch.float32, torch.float64)}
        for s, x in refs.values():
            (s / gvt.to(s.dtype) * case["upstream"]).backward()
        (s32, x32), (s64, x64) = refs[torch.float32], refs[torch.float64]
        assert not o["is_dtensor"]
        assert_close_rule(f"rank {r} loss", o["loss"], s32 / gvt, s64 / gvt, torch.float32)
        assert_close_rule(f"rank {r} validator sum", o["val_sum"], s32, s64, torch.float32)
        assert_close_rule(f"rank {r} grad", o["grad"], x32.grad, x64.grad, torch.float32)
        m = o["metrics"]
        assert int(m["loss_metrics/local_valid_tokens"]) == int((labels != -100).sum())
        assert int(m["loss_metrics/global_valid_tokens"]) == int(gvt)
        torch.testing.assert_close(m["loss_metrics/local_loss_sum"], o["val_sum"])  # same tokens
        total += float(o["loss"]) / 2  # each dp rank's loss appears on its 2 tp ranks
    full, _ = _ref(case["pred"], case["labels"], torch.float64, 0.1, gvt)
    assert total == pytest.approx(float(full / gvt), rel=1e-6)
