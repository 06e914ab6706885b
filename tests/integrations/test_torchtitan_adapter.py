"""xent's torchtitan loss against torchtitan 0.3.0's contract (issue 19 item 1).

Recorded call sites (always run; from torchtitan 0.3.0's installed source):
* trainer.py ``_forward_backward_body``: ``loss, _ = self.loss_fn(pred, labels, global_valid_tokens,
  **loss_kwargs)`` with ``loss_kwargs = {"positions": ...}`` when the batch has positions; the result is
  the local SUM / global_valid_tokens;
* components/validate.py: ``loss_sum, _ = self.loss_fn(predictions, labels)``, accumulated, then
  ``global_avg_loss = global_loss_sum / num_global_valid_tokens``: the call must return the token SUM.
With torchtitan installed (``[frameworks]`` extra), the loss is also built the way 0.3.0 builds one
(``Config(...).build(compile_config=...)``, alone and as ``ChunkedLossWrapper``'s inner loss) and
compared with torchtitan's own ``CrossEntropyLoss``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tolerances import assert_close_rule
from xent_triton.integrations import torchtitan as xtitan

C = 257


def _batch(B=2, S=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, S, C, generator=g) * 3
    labels = torch.randint(0, C, (B, S), generator=g)
    labels[0, :3] = -100
    labels[1, -2:] = -100
    positions = torch.arange(S).expand(B, S)
    return pred, labels, positions


def _torch_sum(pred, labels, dtype):
    return F.cross_entropy(pred.to(dtype).flatten(0, 1), labels.flatten(), reduction="sum")


def test_recorded_trainer_and_validator_calls():
    """The trainer's call (with positions=) is SUM / global_valid_tokens; the validator's is the SUM,
    so its global average is the token mean (not the mean divided by the count again)."""
    loss_fn = xtitan.CrossEntropyLoss()
    pred, labels, positions = _batch()
    n = (labels != -100).sum()
    gvt = n * 3  # e.g. 3 data-parallel ranks
    x = pred.clone().requires_grad_()
    loss, metrics = loss_fn(x, labels, gvt, positions=positions)  # trainer.py, recorded
    (loss * 1.7).backward()  # upstream gradient != 1
    xs = {dt: pred.clone().to(dt).requires_grad_() for dt in (torch.float32, torch.float64)}
    refs = {dt: _torch_sum(xs[dt], labels, dt) / gvt.to(dt) for dt in xs}
    for dt in xs:
        (refs[dt] * 1.7).backward()
    assert_close_rule("train loss", loss, refs[torch.float32], refs[torch.float64], torch.float32)
    assert_close_rule("train grad", x.grad, xs[torch.float32].grad, xs[torch.float64].grad, torch.float32)
    assert int(metrics["loss_metrics/local_valid_tokens"]) == int(n)
    assert int(metrics["loss_metrics/global_valid_tokens"]) == int(gvt)
    with torch.no_grad():
        loss_sum, _ = loss_fn(pred, labels)  # components/validate.py, recorded
        global_avg = loss_sum / n  # what the validator logs
        ref = _torch_sum(pred, labels, torch.float64)
    assert_close_rule("validation sum", loss_sum, _torch_sum(pred, labels, torch.float32), ref, torch.float32)
    assert_close_rule("validation mean", global_avg, _torch_sum(pred, labels, torch.float32) / n, ref / n,
                      torch.float32)


def test_built_as_torchtitan_builds_losses_equals_torchtitans_own():
    pytest.importorskip("torchtitan")
    from torch import nn
    from torchtitan.components.loss import BaseLoss, ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.config import CompileConfig

    Xent = xtitan.XentCrossEntropyLoss
    assert issubclass(Xent, BaseLoss) and Xent.Config._owner is Xent
    compile_config = CompileConfig()
    ours, theirs = Xent.Config().build(compile_config=compile_config), \
        CrossEntropyLoss.Config().build(compile_config=compile_config)
    pred, labels, positions = _batch(seed=1)
    gvt = (labels != -100).sum() + 5
    results = []
    for fn in (ours, theirs):
        x = pred.clone().requires_grad_()
        loss, _ = fn(x, labels, gvt, positions=positions)
        loss.backward()
        with torch.no_grad():
            val, _ = fn(pred, labels)
        results.append((loss, x.grad, val))
    for name, a, b in zip(("train loss", "grad", "validation sum"), *results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # the llama3 registry's default: ChunkedLossWrapper over hidden states, our loss inside
    torch.manual_seed(0)
    head = nn.Linear(16, C, bias=False)
    hidden = torch.randn(2, 8, 16)
    grads = []
    for inner in (Xent.Config(), CrossEntropyLoss.Config()):
        wrapper = ChunkedLossWrapper.Config(num_chunks=2, loss_fn=inner).build(compile_config=compile_config)
        wrapper.set_lm_head(head)
        h = hidden.clone().requires_grad_()
        head.weight.grad = None
        loss, _ = wrapper(h, labels[:, :8], gvt)
        loss.backward()
        grads.append((loss.detach(), h.grad, head.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
