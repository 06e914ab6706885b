"""Vocabulary (tensor) parallelism over torch.distributed: shard layout, cross-entropy, linear head."""
