"""FSDP2 (``fully_shard``) with the fused head: a tiny LM whose head is ``xent_triton.parallel.FusedLMHead``
(the loss computed inside the head's forward, where FSDP has unsharded the weight), world 2 on gloo.
One training step: every rank's loss equals the unsharded model's loss on that rank's batch, and the
gathered gradients equal the unsharded model's gradient of the mean of the ranks' losses (FSDP
reduce-scatters with an average), the head's included.
"""
from __future__ import annotations

import pathlib

import pytest
import torch

from dtensor_cases import TinyLM
from spawn_group import run_group

WORKER = pathlib.Path(__file__).resolve().parents[1] / "harness" / "distributed_worker.py"
V, D, C, WORLD = 11, 16, 37, 2


def _case() -> dict:
    torch.manual_seed(3)
    model = TinyLM(V, D, C)
    g = torch.Generator().manual_seed(4)
    tokens = [torch.randint(0, V, (2, 5), generator=g) for _ in range(WORLD)]
    labels = [torch.randint(0, C, (2, 5), generator=g) for _ in range(WORLD)]
    labels[1][0, :3] = -100  # ranks with different valid-token counts
    return dict(id="fsdp2-tiny-lm-step", calls=[dict(kind="fsdp2", mesh=(WORLD,), dims=(V, D, C),
                                                     state=model.state_dict(), tokens=tokens, labels=labels)])


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    case = _case()
    return case, run_group(WORKER, WORLD, [case], tmp_path_factory.mktemp("fsdp2"), 240)[case["id"]]


def test_fsdp2_step_matches_unsharded_model(result):
    case, res = result
    call = case["calls"][0]
    ref = TinyLM(V, D, C).double()
    ref.load_state_dict(call["state"])
    losses = [ref(call["tokens"][r], call["labels"][r]) for r in range(WORLD)]
    (sum(losses) / WORLD).backward()
    for r, o in enumerate(res):
        assert "error" not in o, o.get("traceback")
        out = o["calls"][0]
        assert "error" not in out, out.get("traceback")
        torch.testing.assert_close(out["loss"].double(), losses[r].detach(), rtol=1e-5, atol=1e-6)
        for name, p in ref.named_parameters():
            torch.testing.assert_close(out["grads"][name].double(), p.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name: f"rank {r} {n}: {m}")
            assert out["placements"][name] == ["S(0)"], (name, out["placements"][name])
