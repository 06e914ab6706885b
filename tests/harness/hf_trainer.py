"""A few steps of transformers' Trainer with gradient accumulation on unequal-length sequences."""
from __future__ import annotations

import torch

from hf_cases import VOCAB


def dataset(n: int = 24, seed: int = 0) -> list[dict]:
    """``n`` sequences of 4..20 tokens; labels -100 on a prompt of 1..3 tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 21, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(1, 4, (1,), generator=g))] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def collate(rows: list[dict]) -> dict:
    """Right padding: pad id 0, attention mask 0, label -100."""
    T = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": torch.zeros(len(rows), T, dtype=torch.long),
           "attention_mask": torch.zeros(len(rows), T, dtype=torch.long),
           "labels": torch.full((len(rows), T), -100, dtype=torch.long)}
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        out["input_ids"][i, :n], out["labels"][i, :n] = r["input_ids"], r["labels"]
        out["attention_mask"][i, :n] = 1
    return out


def train_log(model, output_dir, steps: int = 3, accumulation: int = 4, batch_size: int = 2) -> list[dict]:
    """Per optimizer step: {"loss", "grad_norm"} as the Trainer logs them."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=steps, logging_steps=1, learning_rate=1e-3,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
        dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), data_collator=collate)
    trainer.train()
    logs = trainer.state.log_history
    return [{"loss": h["loss"], "grad_norm": h["grad_norm"]} for h in logs if "loss" in h]
