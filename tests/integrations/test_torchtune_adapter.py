"""xent's torchtune loss against torchtune's two contracts (issue 19 item 2).

* Development branch (recorded from pytorch/torchtune@257ca27, torchtune/modules/loss/loss_types.py):
  ``class SFTLoss(ABC, nn.Module)`` with ``apply_compile_strategy(*args, **kwargs) -> self``, abstract
  ``set_model_output(model)`` and ``forward(outputs, targets)``; recipes call ``set_model_output`` only
  when ``isinstance(loss_fn, SFTLoss)``. A stand-in ABC with those signatures checks the flow.
* torchtune 0.6.1 (when installed: the ``[frameworks]`` extra): its own ``llama3_2`` / ``llama3`` models
  (tied and untied output), the single-device full-finetune recipe's ``_loss_step`` calls (labels
  shifted with an ignore column, logits and labels flattened) after the one ``set_model_output`` step,
  against ``CEWithChunkedOutputLoss`` on a twin model.
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod

import pytest
import torch
from torch import nn

from test_adapters import TuneLM, _tokens_labels
from tolerances import assert_close_rule
from xent_triton.integrations import torchtune as xtune


class RecordedSFTLoss(ABC, nn.Module):
    """The recorded interface (signatures only)."""

    def apply_compile_strategy(self, *args, **kwargs):
        raise NotImplementedError

    @abstractmethod
    def set_model_output(self, model: nn.Module) -> None:
        ...

    @abstractmethod
    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ...


def test_development_branch_sft_loss_contract():
    assert xtune.register_with_sft_loss(xtune.LinearCrossEntropyLoss, RecordedSFTLoss)
    loss_fn = xtune.LinearCrossEntropyLoss()
    assert isinstance(loss_fn, RecordedSFTLoss)
    torch.manual_seed(0)
    model = TuneLM()
    ref = copy.deepcopy(model).double()
    if isinstance(loss_fn, RecordedSFTLoss):  # the recipe's gate
        loss_fn.set_model_output(model)
    assert model.skip_output_layer
    loss_fn = loss_fn.apply_compile_strategy(backend="eager")
    assert isinstance(loss_fn, xtune.LinearCrossEntropyLoss)
    tokens, labels = _tokens_labels()
    loss = loss_fn(model(tokens), labels)
    want = nn.functional.cross_entropy(ref(tokens).flatten(0, 1), labels.flatten())
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-6, atol=1e-7)


def _recipe_loss_step(model, loss_fn, tokens, labels, ignore_index=-100):
    """torchtune 0.6.1 full_finetune_single_device._loss_step (recorded): shift with an ignore column,
    flatten unless the logits are a list of chunks."""
    logits = model(tokens)
    labels = torch.hstack((labels[..., 1:], torch.full((labels.shape[0], 1), ignore_index)))
    if not isinstance(logits, list):
        labels = labels.reshape(-1)
        logits = logits.reshape(-1, logits.size(-1))
    return loss_fn(logits, labels)


@pytest.mark.parametrize("tied", [True, False], ids=["llama3_2-tied", "llama3-untied"])
def test_torchtune_061_model_and_recipe_calls_match_chunked_ce(tied):
    pytest.importorskip("torchtune")
    from torchtune.models.llama3 import llama3
    from torchtune.models.llama3_2 import llama3_2
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    kw = dict(vocab_size=301, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=32, max_seq_len=32)
    torch.manual_seed(0)
    model = llama3_2(**kw, tie_word_embeddings=True) if tied else llama3(**kw)
    twins = {dt: copy.deepcopy(model).to(dt) for dt in (torch.float32, torch.float64)}
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 301, (2, 16), generator=g)
    labels = tokens.clone()
    labels[0, :5] = -100
    loss_fn = xtune.LinearCrossEntropyLoss()
    loss_fn.set_model_output(model)  # the one step beyond the YAML on 0.6.1
    assert model(tokens).shape == (2, 16, 32)  # the projection is skipped
    losses = {"ours": _recipe_loss_step(model, loss_fn, tokens, labels)}
    for dt, twin in twins.items():  # the recipe's path for CEWithChunkedOutputLoss
        ce = CEWithChunkedOutputLoss(num_output_chunks=4)
        twin.set_num_output_chunks(ce.num_output_chunks)
        losses[dt] = _recipe_loss_step(twin, ce, tokens, labels)
    for loss in losses.values():
        (loss * 0.7).backward()
    assert_close_rule("loss", losses["ours"], losses[torch.float32], losses[torch.float64], torch.float32)
    named = [dict(m.named_parameters()) for m in (model, twins[torch.float32], twins[torch.float64])]
    assert named[0].keys() == named[2].keys()  # state dict unchanged
    for name in named[2]:
        assert_close_rule(name, named[0][name].grad, named[1][name].grad, named[2][name].grad, torch.float32)


def test_torchtune_061_yaml_only_through_its_own_instantiate():
    """The YAML-only use: torchtune's own ``config.instantiate`` of the recipe's ``model`` and ``loss``
    nodes (model built first, as the recipe does), then the recipe's loss step; state dict unchanged."""
    pytest.importorskip("torchtune")
    import gc

    from omegaconf import OmegaConf
    from torchtune import config
    from torchtune.models.llama3_2 import llama3_2
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    kw = dict(vocab_size=301, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=32, max_seq_len=32)
    cfg = OmegaConf.create({
        "model": {"_component_": "xent_triton.integrations.torchtune.output_skipped",
                  "builder": "torchtune.models.llama3_2.llama3_2", **kw},
        "loss": {"_component_": "xent_triton.integrations.torchtune.LinearCrossEntropyLoss"}})
    torch.manual_seed(0)
    ref = llama3_2(**kw).double()
    model = config.instantiate(cfg.model)
    assert model.state_dict().keys() == ref.state_dict().keys()
    model.load_state_dict(ref.state_dict())  # what the recipe does with the checkpoint
    loss_fn = config.instantiate(cfg.loss)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 301, (2, 12), generator=g)
    labels = tokens.masked_fill(torch.rand(2, 12, generator=g) < 0.3, -100)
    loss = _recipe_loss_step(model, loss_fn, tokens, labels)
    ce = CEWithChunkedOutputLoss(num_output_chunks=4)
    ref.set_num_output_chunks(4)
    want = _recipe_loss_step(ref, ce, tokens, labels)
    assert_close_rule("loss", loss, None, want, torch.float32)
    del model, loss_fn, loss
    gc.collect()
