"""One line for a transformers ``Trainer`` user: ``xhf.fused_trainer(trainer)``.

It applies the fused head (:func:`~xent_triton.integrations.hf_fused.apply`) to the trainer's model and
logs, with every loss the Trainer logs, the token accuracy and the mean entropy of the loss's own pass
(``return_stats``: no second pass over the vocabulary) under TRL SFTTrainer's key names:
``mean_token_accuracy`` = sum correct / sum valid and ``entropy`` = sum entropy / sum valid over the
logging interval (every micro-batch, every data-parallel rank), and ``eval_mean_token_accuracy`` /
``eval_entropy`` (``<prefix>_...``) over an evaluation. The sums stay on the device per micro-batch;
each log step all-reduces them (one collective, entered by every rank: the Trainer logs on every
rank) and moves three numbers to the host once.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .hf_fused import apply


class IntervalStats:
    """Device sums (n_valid, n_correct, entropy_sum) per mode ("train" / "eval") since the last log."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}

    def add(self, stats: Any, training: bool) -> None:
        """Add one micro-batch's ``LossStats`` (no host sync)."""
        mode = "train" if training else "eval"
        with torch.no_grad():
            dt = torch.float32 if stats.n_valid.device.type == "mps" else torch.float64
            v = torch.stack([stats.n_valid.to(dt), stats.n_correct.to(dt), stats.entropy_sum.detach().to(dt)])
            if mode in self.sums:
                self.sums[mode] += v
            else:
                self.sums[mode] = v

    def pop(self, mode: str, device: Any) -> Tensor:
        """The sums of ``mode`` (zeros if none: every rank must enter the all-reduce), and reset them."""
        v = self.sums.pop(mode, None)
        return torch.zeros(3, dtype=torch.float64, device=device) if v is None else v


def _log_mode(logs: dict) -> Optional[tuple[str, str]]:
    """(mode, key prefix) of a Trainer log that reports a loss: training ("loss") or an evaluation
    ("<prefix>_loss", e.g. eval_loss); None for the others (the end-of-training summary's train_loss)."""
    if "loss" in logs:
        return "train", ""
    for k in logs:
        if k.endswith("_loss") and k != "train_loss":
            return "eval", k[: -len("loss")]
    return None


class _Log:
    """``trainer.log`` with the interval's token accuracy and entropy added (picklable, no closure)."""

    def __init__(self, trainer: Any, original: Any, stats: IntervalStats):
        self.trainer, self.original, self.stats = trainer, original, stats

    def __call__(self, logs: dict, *args: Any, **kwargs: Any):
        found = _log_mode(logs)
        if found is not None:
            mode, prefix = found
            sums = self.stats.pop(mode, self.trainer.args.device)
            sums = self.trainer.accelerator.reduce(sums, reduction="sum")
            n_valid, n_correct, entropy = sums.tolist()  # the one device -> host transfer of this log step
            logs[f"{prefix}mean_token_accuracy"] = n_correct / n_valid if n_valid else 0.0
            logs[f"{prefix}entropy"] = entropy / n_valid if n_valid else 0.0
        return self.original(logs, *args, **kwargs)


def fused_trainer(trainer: Any, *, log_stats: bool = True) -> Any:
    """Train ``trainer``'s model with the fused head and log its token accuracy and entropy.

    Call it once after building the ``Trainer`` (returns it). The model must not be wrapped yet
    (PEFT: the base model is used). ``log_stats=False`` only applies the head (the same as
    ``xhf.apply(model)``).

    Example:
        >>> trainer = xhf.fused_trainer(Trainer(model=model, args=args, train_dataset=ds))
        >>> trainer.train()   # logs loss, grad_norm, mean_token_accuracy, entropy (and eval_...)
    """
    model = trainer.model
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    apply(model)
    if log_stats and model._xent_fused.metrics is None:
        stats = IntervalStats()
        model._xent_fused.metrics = stats
        trainer.log = _Log(trainer, trainer.log, stats)
    return trainer


__all__ = ["fused_trainer", "IntervalStats"]
