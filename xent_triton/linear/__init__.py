"""Fused linear cross-entropy (logits never materialised): ops, functional API, module."""
