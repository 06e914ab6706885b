"""The KL family: distillation losses and token log-probabilities (see docs/kl.md)."""
