"""torchtitan- and torchtune-style adapters and ``FusedLMHead`` on tiny models, single process,
against the logits path in float64 (no import of torchtitan / torchtune). The DTensor (vocabulary
sharded, O(tokens) communication) case of the torchtitan loss is in tests/parallel/test_dtensor.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xent_triton.integrations import torchtitan, torchtune
from xent_triton.parallel import FusedLMHead

V, D, C = 13, 16, 41


class TuneLM(nn.Module):
    """torchtune's contract: ``skip_output_layer`` makes forward return the final hidden states."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(C if tied else V, D)
        self.norm = nn.LayerNorm(D)
        self.skip_output_layer = False
        if tied:  # torchtune's TiedLinear: the output shares the embedding's weight
            self.output = type("TiedLinear", (), {"tied_module": self.tok})()
        else:
            self.output = nn.Linear(D, C, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.tok(tokens))
        if self.skip_output_layer:
            return h
        w = self.output.tied_module.weight if hasattr(self.output, "tied_module") else self.output.weight
        return F.linear(h, w)


def _tokens_labels(masked_row: bool = True):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (3, 7), generator=g)
    labels = torch.randint(0, C, (3, 7), generator=g)
    labels[0, :4] = -100
    if masked_row:
        labels[2] = -100
    return tokens, labels


@pytest.mark.parametrize("given", [None, 40], ids=["validator-sum", "global-valid-tokens-40"])
def test_torchtitan_loss_local_sum_over_valid_tokens(given):
    g = torch.Generator().manual_seed(1)
    pred = (torch.randn(2, 5, C, generator=g) * 2).requires_grad_()
    labels = torch.randint(0, C, (2, 5), generator=g)
    labels[1, 2:] = -100
    loss, metrics = torchtitan.CrossEntropyLoss(label_smoothing=0.1)(pred, labels, given)
    loss.backward()
    ref_x = pred.detach().double().requires_grad_()
    s = F.cross_entropy(ref_x.flatten(0, 1), labels.flatten(), reduction="sum", label_smoothing=0.1)
    ref = s / given if given is not None else s  # torchtitan 0.3.0: the SUM without global_valid_tokens
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pred.grad.double(), ref_x.grad, rtol=1e-5, atol=1e-7)
    keys = {"loss_metrics/local_loss_sum", "loss_metrics/local_valid_tokens"}
    assert set(metrics) == (keys if given is None else keys | {"loss_metrics/global_valid_tokens"})
    assert int(metrics["loss_metrics/local_valid_tokens"]) == 7


def test_torchtitan_fully_masked_rank_contributes_zero():
    """A data-parallel rank whose tokens are all padding: loss 0 and zero gradients, not NaN."""
    pred = torch.randn(1, 4, C, requires_grad=True)
    labels = torch.full((1, 4), -100)
    for given in (None, torch.tensor(12)):
        loss, _ = torchtitan.cross_entropy_loss(pred, labels, given)
        loss.backward()
        assert loss.item() == 0.0 and torch.all(pred.grad == 0)


@pytest.mark.parametrize("tied", [False, True], ids=["linear-output", "tied-output"])
def test_torchtune_sft_loss_fused_head(tied: bool):
    torch.manual_seed(0)
    model = TuneLM(tied)
    ref_model = TuneLM(tied).double()
    ref_model.load_state_dict(model.state_dict())
    loss_fn = torchtune.LinearCrossEntropyLoss(ignore_index=-100)
    loss_fn.set_model_output(model)
    assert model.skip_output_layer
    tokens, labels = _tokens_labels()
    loss = loss_fn(model(tokens), labels)
    loss.backward()
    ref = F.cross_entropy(ref_model(tokens).flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-7)
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_torchtune_all_masked_batch_is_zero_not_nan():
    model = TuneLM()
    loss_fn = torchtune.LinearCrossEntropyLoss()
    loss_fn.set_model_output(model)
    tokens, _ = _tokens_labels()
    loss = loss_fn(model(tokens), torch.full(tokens.shape, -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(model.output.weight.grad == 0)


def test_torchtune_needs_set_model_output():
    with pytest.raises(RuntimeError, match="set_model_output"):
        torchtune.LinearCrossEntropyLoss()(torch.randn(1, 2, D), torch.zeros(1, 2, dtype=torch.long))


def test_fused_lm_head_loss_and_logits():
    torch.manual_seed(2)
    head = FusedLMHead(D, C, bias=True, label_smoothing=0.1)
    h = torch.randn(3, 5, D, requires_grad=True)
    y = torch.randint(0, C, (3, 5))
    loss = head(h, y)
    loss.backward()
    ref_h, W, b = (t.detach().double().requires_grad_() for t in (h, head.weight, head.bias))
    ref = F.cross_entropy(F.linear(ref_h, W, b).flatten(0, 1), y.flatten(), label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-7)
    for ours, theirs in ((h.grad, ref_h.grad), (head.weight.grad, W.grad), (head.bias.grad, b.grad)):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head(h), F.linear(h, head.weight, head.bias))
