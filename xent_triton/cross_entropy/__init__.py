"""Cross-entropy over materialised logits: ops (custom ops + launchers), functional API, module."""
