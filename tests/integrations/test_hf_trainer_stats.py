"""``xhf.fused_trainer(trainer)``: the one line for a transformers Trainer user (issue 19 item 3).

A tiny Llama trains 4 optimizer steps (gradient accumulation 2, logging every 2 steps, one evaluation)
with the learning rate 0, so that every micro-batch sees the initial weights (CPU: the torch path):
the logged ``mean_token_accuracy`` and ``entropy`` of each logging interval (and ``eval_...`` of the
evaluation) must equal a float64 computation over the same micro-batches, and the training forward
must form the logits once (one pass over the vocabulary per micro-batch, gradients included).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hf_cases import VOCAB, LogitRows, tiny_model
from hf_trainer import collate, dataset
from xent_triton.integrations import transformers as xhf


def _reference(model64, batches) -> tuple[float, float]:
    """(accuracy, mean entropy) over ``batches`` in float64: sum correct / sum valid, sum H / sum valid."""
    valid = correct = entropy = 0.0
    with torch.no_grad():
        for b in batches:
            logits = model64(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            y = F.pad(b["labels"], (0, 1), value=-100)[:, 1:]
            m = y != -100
            lq = torch.log_softmax(logits, -1)
            valid += float(m.sum())
            correct += float(((logits.argmax(-1) == y) & m).sum())
            entropy += float((-(lq.exp() * lq).sum(-1) * m).sum())
    return correct / valid, entropy / valid


def test_fused_trainer_logs_interval_accuracy_and_entropy(tmp_path, monkeypatch):
    from transformers import Trainer, TrainingArguments

    if not torch.cuda.is_available():  # the torch path (fast on CPU): the kernels are tested elsewhere
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = tiny_model("llama")
    model64 = copy.deepcopy(model).double().eval()
    seen = {"train": [], "eval": []}

    def recording_collate(rows):
        batch = collate(rows)
        seen["train" if model.training else "eval"].append(batch)
        return batch

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=3,
        gradient_accumulation_steps=2, max_steps=4, logging_steps=2, eval_strategy="steps", eval_steps=4,
        learning_rate=0.0, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0)
    trainer = xhf.fused_trainer(Trainer(model=model, args=args, train_dataset=dataset(16),
                                        eval_dataset=dataset(7, seed=5), data_collator=recording_collate))
    counter = LogitRows(VOCAB)
    with counter:
        trainer.train()
    logs = trainer.state.log_history
    train_logs = [h for h in logs if "loss" in h]
    eval_logs = [h for h in logs if "eval_loss" in h]
    assert len(train_logs) == 2 and len(eval_logs) == 1 and len(seen["train"]) == 8
    for i, h in enumerate(train_logs):  # each interval: 2 optimizer steps x 2 micro-batches
        acc, ent = _reference(model64, seen["train"][4 * i:4 * i + 4])
        assert h["mean_token_accuracy"] == pytest.approx(acc, abs=1e-12)
        assert h["entropy"] == pytest.approx(ent, rel=1e-5)
    acc, ent = _reference(model64, seen["eval"])
    assert eval_logs[0]["eval_mean_token_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert eval_logs[0]["eval_entropy"] == pytest.approx(ent, rel=1e-5)
    assert not any("mean_token_accuracy" in h for h in logs if "train_loss" in h)
    # training: the logits of each position formed once (the fused pass, gradients included; evaluation
    # gets its logits from the stock lm_head, whose nn.Linear the counter does not see)
    assert counter.rows == sum(b["input_ids"].numel() for b in seen["train"])
