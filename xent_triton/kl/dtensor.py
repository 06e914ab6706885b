"""DTensor logits for ``token_logprobs`` and ``distillation_loss`` (the CE heads' rules,
``parallel/dtensor.py``): a mesh dim with ``Shard(-1)`` (the class dim) is the tensor-parallel dim
and runs the vocabulary-parallel code (``kl/parallel.py``, ``kl/parallel_distill.py``) on
``mesh.get_group(that dim)`` with the ``torch.chunk`` layout (an empty shard is fine); ``Shard``
of a leading dim = other tokens (data parallel inside the mesh); ``Replicate`` everywhere = the
local path. Student and teacher must have the same placements (the same layout).

Returned values are DTensors on the input's mesh: per-token outputs (log-probs, entropy,
``reduction="none"``) ``Shard`` on the batch-sharded mesh dims as the input and ``Replicate`` on
the TP dim; a ``mean`` / ``sum`` loss ``Replicate`` everywhere, over ALL tokens of the mesh (one
all-reduce of 2 numbers over the batch-sharded dims). Gradients come back with the logits'
placements. Tokens / labels: a DTensor (its local part is used) or a plain tensor holding THIS
rank's tokens' global ids.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..parallel.dtensor import DTensor, Partial, Replicate, _chunk_start, _local, plan


def rows_dtensor(r: Tensor, mesh: Any, rows_pl: list, shape: torch.Size) -> "DTensor":
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(r, mesh, rows_pl, shape=shape, stride=stride)


def dtensor_token_logprobs(logits: "DTensor", tokens: Any, temperature: float, return_entropy: bool):
    """``token_logprobs`` of DTensor logits (..., C)."""
    from .functional import token_logprobs
    from .parallel import vocab_parallel_token_logprobs
    tp, rows_pl, _batch = plan(logits, logits.dim() - 1, "token_logprobs on a DTensor")
    mesh, x, tok = logits.device_mesh, logits.to_local(), _local(tokens)
    if tp is None:
        res = token_logprobs(x, tok, temperature=temperature, return_entropy=return_entropy)
    else:
        start = _chunk_start(logits.shape[-1], mesh.size(tp), mesh.get_local_rank(tp))
        res = vocab_parallel_token_logprobs(x, tok, temperature, return_entropy, mesh.get_group(tp), start)
    outs = res if return_entropy else (res,)
    outs = tuple(rows_dtensor(o, mesh, rows_pl, logits.shape[:-1]) for o in outs)
    return outs if return_entropy else outs[0]


def dtensor_distillation_loss(student: "DTensor", teacher: Any, labels: Optional[Any], options: dict):
    """``distillation_loss`` of DTensor student / teacher logits on the same mesh and placements."""
    from .functional import distillation_loss
    from .parallel_distill import vocab_parallel_distillation_loss
    what = "distillation_loss on DTensors"
    if not isinstance(teacher, DTensor) or teacher.device_mesh != student.device_mesh \
            or list(teacher.placements) != list(student.placements):
        raise ValueError(f"{what}: teacher_logits must be a DTensor on the student's mesh with its "
                         f"placements ({student.placements}): student and teacher share one layout")
    tp, rows_pl, batch = plan(student, student.dim() - 1, what)
    mesh, x, t, lbl = student.device_mesh, student.to_local(), teacher.to_local(), _local(labels)
    reduction = options["reduction"]
    per_token = dict(options, reduction="none")
    if tp is None:
        rows = distillation_loss(x, t, lbl, **per_token)
    else:
        start = _chunk_start(student.shape[-1], mesh.size(tp), mesh.get_local_rank(tp))
        rows = vocab_parallel_distillation_loss(x, t, lbl, per_token, mesh.get_group(tp), start)
    if reduction == "none":
        return rows_dtensor(rows, mesh, rows_pl, student.shape[:-1])
    ignore = -100 if options["ignore_index"] is None else options["ignore_index"]
    valid = torch.ones_like(rows) if lbl is None else (lbl != ignore).to(rows.dtype)
    local = torch.stack([rows.sum(), valid.sum()])
    if batch:  # the local sums over the batch-sharded mesh dims: one all-reduce of 2 numbers
        part = [Partial() if i in batch else Replicate() for i in range(mesh.ndim)]
        local = DTensor.from_local(local, mesh, part).redistribute(mesh, [Replicate()] * mesh.ndim).to_local()
    total, den = local.unbind()
    if reduction == "sum":
        loss = total
    else:
        if options["empty_batch"] == "zero":
            den = torch.where(den == 0, torch.ones_like(den), den)
        loss = total / den
    return DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim)
