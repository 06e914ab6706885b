"""Fine-tune a tiny random-init Llama-style model with transformers' Trainer: stock head vs xent's fused head.

    python -m perf.finetune_example                    # CPU: xent's pure-torch chunked path, no interpreter
    python -m perf.finetune_example --vocab 128256 --seq 512 --steps 20     # on a GPU

Builds the model from a config (no download), trains it for a few steps twice from the same weights
on the same unequal-length sequences (gradient accumulation 2): once stock, once with
``xent_triton.integrations.transformers.apply(model)``. Prints the loss of every step side by side and
the peak memory of the training run above what was live before it (CUDA allocator, or the CPU
profiler's memory events), with the bytes of one micro-batch's float32 logits for scale: the fused
head never materialises them (nor their gradient, nor log-softmax intermediates).
"""
from __future__ import annotations

import argparse
import copy
import tempfile

import torch

MiB = 2 ** 20


def _dataset(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(seq // 2, seq + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 8] = -100  # a prompt without loss
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _collate(rows: list[dict]) -> dict:
    T = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": torch.zeros(len(rows), T, dtype=torch.long),
           "attention_mask": torch.zeros(len(rows), T, dtype=torch.long),
           "labels": torch.full((len(rows), T), -100, dtype=torch.long)}
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        out["input_ids"][i, :n], out["labels"][i, :n] = r["input_ids"], r["labels"]
        out["attention_mask"][i, :n] = 1
    return out


def _train(model, args, data, device: str):
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from perf.measure import paired
    from perf.memory import peak_extra_bytes

    with tempfile.TemporaryDirectory() as out_dir:
        targs = TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=args.batch, gradient_accumulation_steps=2,
            max_steps=args.steps, logging_steps=1, learning_rate=1e-3, report_to="none", save_strategy="no",
            use_cpu=device == "cpu", disable_tqdm=True, seed=0, bf16=args.bf16)
        trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=_collate)
        trainer.remove_callback(PrinterCallback)  # the table below prints the losses
        held = {}  # one training run: its peak extra memory, timed
        train = {"train": lambda: held.update(peak=peak_extra_bytes(trainer.train, device))}
        seconds = paired(train, iters=1, warmup=0, device=device)["train"][0]
        peak = held["peak"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, peak, seconds


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (autocast)")
    args = p.parse_args()
    device = "cuda" if cuda else "cpu"

    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    from xent_triton.integrations import transformers as xhf

    logging.set_verbosity_error()
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.seq, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    data = _dataset(2 * args.batch * args.steps, args.seq, args.vocab)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"Llama-style model: {n_params / 1e6:.1f} M parameters, vocabulary {args.vocab}, "
          f"hidden {args.hidden}, "
          f"{args.layers} layers; {args.steps} steps of batch {args.batch} x <= {args.seq} tokens, "
          f"gradient accumulation 2, on {device}{' (bf16 autocast)' if args.bf16 else ''}")
    logits_bytes = args.batch * args.seq * args.vocab * 4
    runs = {}
    for name in ("stock", "xent fused"):
        model = copy.deepcopy(base).to(device)
        if name != "stock":
            xhf.apply(model)
        runs[name] = _train(model, args, data, device)
    print(f"\n{'step':>4} " + " ".join(f"{n + ' loss':>16}" for n in runs))
    for i in range(args.steps):
        print(f"{i + 1:>4} " + " ".join(f"{runs[n][0][i]:16.6f}" for n in runs))
    print(f"\n{'':18}{'peak extra memory':>20}{'train time':>12}")
    for n, (_, peak, seconds) in runs.items():
        print(f"{n:18}{peak / MiB:16.1f} MiB{seconds:10.1f} s")
    saved = runs["stock"][1] - runs["xent fused"][1]
    print(f"\nfused head saves {saved / MiB:.1f} MiB of peak memory; one micro-batch's float32 logits "
          f"(B x T x V x 4 bytes) = {logits_bytes / MiB:.1f} MiB "
          f"({'at least' if saved >= logits_bytes else 'LESS THAN'} the logits' bytes)")


if __name__ == "__main__":
    main()
