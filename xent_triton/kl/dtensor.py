"""DTensor logits for ``token_logprobs`` and ``distillation_loss`` (the CE heads' rules,
``core/dtensor.py``): a mesh dim with ``Shard(-1)`` (the class dim) is the tensor-parallel dim
and runs the vocabulary-parallel code (``kl/parallel.py``, ``kl/parallel_distill.py``) on
``mesh.get_group(that dim)`` with the ``torch.chunk`` layout (an empty shard is fine); ``Shard``
of a leading dim = other tokens (data parallel inside the mesh); ``Replicate`` everywhere = the
single-device ops on the local part. Student and teacher must have the same placements.

Returned values are DTensors on the input's mesh: per-token outputs (log-probs, entropy,
``reduction="none"``) ``Shard`` on the batch-sharded mesh dims as the input and ``Replicate`` on
the TP dim; a ``mean`` / ``sum`` loss ``Replicate`` everywhere, over ALL tokens of the mesh (one
all-reduce of 2 numbers over the batch-sharded dims). Gradients come back with the logits'
placements. Tokens / labels: a DTensor (its local part is used) or a plain tensor holding THIS
rank's tokens' global ids. The options arrive validated (``functional``): ``error`` is this
rank's validation error, raised on every rank of the TP group after the layout exchange.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..core.dtensor import DTensor, Partial, Replicate, plan
from ..core.inputs import class_ids
from ..core.reduction import finish_sums, row_sums
from .ops import distillation_rows, token_logprobs_rows, token_range_check
from .options import KLOptions
from .parallel import vocab_parallel_token_logprobs
from .parallel_distill import vocab_parallel_distillation_rows


def local_part(t: Any) -> Any:
    """The local part of a DTensor (differentiable), anything else unchanged."""
    return t.to_local() if isinstance(t, DTensor) else t


def chunk_start(n: int, parts: int, index: int) -> int:
    """First element of chunk ``index`` when ``torch.chunk`` splits n into ``parts``."""
    return min(n, index * -(-n // parts))


def rows_dtensor(r: Tensor, mesh: Any, rows_pl: list, shape: torch.Size) -> "DTensor":
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(r, mesh, rows_pl, shape=shape, stride=stride)


def dtensor_token_logprobs(logits: "DTensor", tokens: Any, temperature: float, return_entropy: bool,
                           error: Optional[BaseException] = None):
    """``token_logprobs`` of DTensor logits (..., C)."""
    tp, rows_pl, _batch = plan(logits, logits.dim() - 1, "token_logprobs on a DTensor")
    mesh, x, tok = logits.device_mesh, logits.to_local(), local_part(tokens)
    if tp is None:
        if error is not None:
            raise error
        ids = class_ids(tok, x.shape[:-1], "input's leading shape")
        token_range_check(ids, x.shape[-1])
        opts = KLOptions(temperature=temperature, return_entropy=bool(return_entropy))
        lp, ent, _ = token_logprobs_rows(x.reshape(ids.numel(), x.shape[-1]), ids, opts)
        outs = (lp, ent) if return_entropy else (lp,)
    else:
        start = chunk_start(logits.shape[-1], mesh.size(tp), mesh.get_local_rank(tp))
        res = vocab_parallel_token_logprobs(x, tok, temperature, return_entropy, mesh.get_group(tp), start,
                                            None, error)
        outs = res if return_entropy else (res,)
    outs = tuple(rows_dtensor(o.reshape(logits.shape[:-1]), mesh, rows_pl, logits.shape[:-1]) for o in outs)
    return outs if return_entropy else outs[0]


def dtensor_distillation_loss(student: "DTensor", teacher: Any, labels: Optional[Any],
                              chosen: Optional[tuple], error: Optional[BaseException] = None):
    """``distillation_loss`` of DTensor student / teacher logits on the same mesh and placements;
    ``chosen``: the validated ``KLOptions`` (None with ``error``)."""
    what = "distillation_loss on DTensors"
    if not isinstance(teacher, DTensor) or teacher.device_mesh != student.device_mesh \
            or list(teacher.placements) != list(student.placements):
        raise ValueError(f"{what}: teacher_input must be a DTensor on the student's mesh with its "
                         f"placements ({student.placements}): student and teacher share one layout")
    tp, rows_pl, batch = plan(student, student.dim() - 1, what)
    mesh, x, t, lbl = student.device_mesh, student.to_local(), teacher.to_local(), local_part(labels)
    if tp is None:
        if error is not None:
            raise error
        opts = chosen
        flat = None if lbl is None else class_ids(lbl, x.shape[:-1], "input's leading shape")
        C = x.shape[-1]
        rows, _ = distillation_rows(x.reshape(-1, C), t.detach().reshape(-1, C), flat, opts)
    else:
        start = chunk_start(student.shape[-1], mesh.size(tp), mesh.get_local_rank(tp))
        rows, flat = vocab_parallel_distillation_rows(x, t, lbl, chosen, mesh.get_group(tp), start, None,
                                                      error)
    opts = chosen
    if opts.reduction == "none":
        return rows_dtensor(rows.reshape(student.shape[:-1]), mesh, rows_pl, student.shape[:-1])
    valid = torch.ones_like(rows, dtype=torch.bool) if flat is None else flat != opts.ignore_index
    local = row_sums(rows, valid.to(rows.dtype), valid, None, opts)  # the CE heads' one reduction
    if batch:  # the local sums over the batch-sharded mesh dims: one all-reduce of 4 numbers
        part = [Partial() if i in batch else Replicate() for i in range(mesh.ndim)]
        repl = [Replicate()] * mesh.ndim
        local = DTensor.from_local(local, mesh, part).redistribute(mesh, repl).to_local()
    loss = finish_sums(local, opts)
    return DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim)
