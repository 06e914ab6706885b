"""Type-checked by mypy in CI (pyproject.toml [tool.mypy] files), never run: how a typed user's code
reads the public API through the shipped ``py.typed``. A plain call types as a Tensor (so
``loss.backward()`` checks), a call with ``return_lse`` / ``return_stats`` / ``return_entropy`` as a
tuple to unpack."""
import torch

import xent_triton


def usage(x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
    loss: torch.Tensor = xent_triton.cross_entropy(x, y, label_smoothing=0.1)
    loss.backward()
    loss, lse = xent_triton.cross_entropy(x, y, return_lse=True)
    lse.exp()
    loss = xent_triton.linear_cross_entropy(h, w, y, reduction="sum")
    loss.backward()
    loss, stats = xent_triton.linear_cross_entropy(h, w, y, return_stats=True)
    logp: torch.Tensor = xent_triton.token_logprobs(x, y, temperature=0.7)
    logp, ent = xent_triton.token_logprobs(x, y, return_entropy=True)
    logp = xent_triton.linear_token_logprobs(h, w, y)
    logp.sum().backward()
    loss = xent_triton.CrossEntropyLoss(reduction="sum")(x, y)
    loss.backward()
