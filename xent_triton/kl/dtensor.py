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

The linear forms (``linear_token_logprobs``, ``linear_distillation_loss``) follow the CE linear
head's DTensor rules (``core/dtensor.head_plan``): the head weight (and bias) ``Shard(0)`` on
the TP mesh dim, the hidden states replicated there (``Shard`` of a leading dim elsewhere = other
tokens); the teacher's hidden states / head / bias placed as the student's. The hidden states'
gradient comes back replicated over the TP dim (summed there in backward), the head's with its
placements (summed over batch-sharded mesh dims it is replicated on). The TP group also agrees on
which mesh dims shard the tokens (a rank placed otherwise raises on every rank).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..core.dtensor import DTensor, Partial, Replicate, agree_rows, chunk_start, head_plan, local_part, plan
from ..core.exchange import ReduceGradOver, agreement
from ..core.inputs import class_ids, target_range_check
from ..core.reduction import finish_sums, row_sums
from .ops import distillation_rows, token_logprobs_rows
from .options import KLOptions
from .parallel import vocab_parallel_token_logprobs
from .parallel_distill import vocab_parallel_distillation_rows
from .parallel_linear import vocab_parallel_linear_distillation_rows, vocab_parallel_linear_token_logprobs
from .weights import agree_token_weight, parallel_token_weight, weighted


def rows_dtensor(r: Tensor, local_shape: torch.Size, mesh: Any, rows_pl: list,
                 shape: torch.Size) -> "DTensor":
    """Per-token values of THIS rank's tokens (``local_shape``) as a DTensor of the global ``shape``."""
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(r.reshape(local_shape), mesh, rows_pl, shape=shape, stride=stride)


def agree_local(what: str, mesh: Any, batch: list, opts: Optional[KLOptions], error: Optional[BaseException],
                ids: Any, C: int, hint: Tensor, lead: Optional[torch.Size] = None) -> None:
    """No vocabulary-parallel dim, but a loss reduced over (or a head's gradient summed over) the
    batch-sharded mesh dims: this rank's invalid option, token weight or target (not integer ids of
    the ``lead`` shape when given; ids outside [0, C) on CPU) joins the options agreement there
    (``core/dtensor.agree_rows``), so every rank raises alike instead of one raising while the
    others wait in that collective. No batch-sharded dim: no exchange, the error is raised here."""
    if error is None and ids is not None:
        try:
            if lead is not None:
                ids = class_ids(ids, lead, "input's leading shape")
            target_range_check(ids, C, opts.ignore_index if opts is not None else -100)
        except (TypeError, ValueError, IndexError) as e:
            error = e
    agree = agreement(None, opts if opts is not None else KLOptions())
    agree_rows(what, mesh, batch, agree, None, error, hint)


def dtensor_token_logprobs(logits: "DTensor", tokens: Any, temperature: float, return_entropy: bool,
                           error: Optional[BaseException] = None, softcap: float = 0.0,
                           token_weight: Any = None, ignore_index: int = -100):
    """``token_logprobs`` of DTensor logits (..., C); ``softcap`` validated (0.0: none);
    ``token_weight``: a DTensor placed as the tokens or a plain tensor of THIS rank's tokens;
    ``ignore_index`` validated (agreed on by the TP group: its rows skipped on every shard)."""
    tp, rows_pl, _batch = plan(logits, logits.dim() - 1, "token_logprobs on a DTensor")
    mesh, x, tok = logits.device_mesh, logits.to_local(), local_part(tokens)
    tw, error = parallel_token_weight(local_part(token_weight), x, error)
    if tp is None:
        if error is not None:
            raise error
        ids = class_ids(tok, x.shape[:-1], "input's leading shape")
        target_range_check(ids, x.shape[-1], ignore_index)
        opts = KLOptions(temperature=temperature, return_entropy=bool(return_entropy), softcap=softcap,
                         ignore_index=ignore_index)
        lp, ent, _ = token_logprobs_rows(x.reshape(ids.numel(), x.shape[-1]), ids, opts)
        outs = (lp, ent) if return_entropy else (lp,)
    else:
        start = chunk_start(logits.shape[-1], mesh.size(tp), mesh.get_local_rank(tp))
        res = vocab_parallel_token_logprobs(x, tok, temperature, return_entropy, mesh.get_group(tp), start,
                                            agree_token_weight(token_weight), error, softcap, ignore_index)
        outs = res if return_entropy else (res,)
    outs = weighted(tuple(o.reshape(-1) for o in outs), tw)
    outs = tuple(rows_dtensor(o, x.shape[:-1], mesh, rows_pl, logits.shape[:-1]) for o in outs)
    return outs if return_entropy else outs[0]


def dtensor_distillation_loss(student: "DTensor", teacher: Any, labels: Optional[Any],
                              chosen: Optional[KLOptions], error: Optional[BaseException] = None,
                              token_weight: Any = None):
    """``distillation_loss`` of DTensor student / teacher logits on the same mesh and placements;
    ``chosen``: the validated ``KLOptions`` (None with ``error``); ``token_weight`` as
    ``dtensor_token_logprobs``'."""
    what = "distillation_loss on DTensors"
    if not isinstance(teacher, DTensor) or teacher.device_mesh != student.device_mesh \
            or list(teacher.placements) != list(student.placements):
        raise ValueError(f"{what}: teacher_input must be a DTensor on the student's mesh with its "
                         f"placements ({student.placements}): student and teacher share one layout")
    tp, rows_pl, batch = plan(student, student.dim() - 1, what)
    mesh, x, t, lbl = student.device_mesh, student.to_local(), teacher.to_local(), local_part(labels)
    tw, error = parallel_token_weight(local_part(token_weight), x, error)
    if tp is None:
        flat = None
        try:
            flat = None if lbl is None else class_ids(lbl, x.shape[:-1], "input's leading shape")
        except (TypeError, ValueError) as e:
            error = error or e
        C = x.shape[-1]
        agree_local(what, mesh, batch, chosen, error, flat, C, x)
        opts = chosen
        rows, _ = distillation_rows(x.reshape(-1, C), t.detach().reshape(-1, C), flat, opts)
    else:
        start = chunk_start(student.shape[-1], mesh.size(tp), mesh.get_local_rank(tp))
        rows, flat = vocab_parallel_distillation_rows(x, t, lbl, chosen, mesh.get_group(tp), start, None,
                                                      error)
    assert chosen is not None  # else the calls above raised the error, on every rank
    return mesh_loss(rows, flat, chosen, mesh, rows_pl, batch, x.shape[:-1], student.shape[:-1], tw)


def mesh_loss(rows: Tensor, flat: Optional[Tensor], opts: KLOptions, mesh: Any, rows_pl: list, batch: list,
              local_shape: torch.Size, shape: torch.Size, tw: Optional[Tensor] = None) -> "DTensor":
    """The per-token losses of THIS rank's tokens reduced over the whole mesh (a DTensor); ``tw``:
    their (R,) token weights (each loss and, for mean, its share of the denominator)."""
    if tw is not None:
        rows = rows.reshape(-1) * tw.to(rows.dtype)
    if opts.reduction == "none":
        return rows_dtensor(rows, local_shape, mesh, rows_pl, shape)
    valid = torch.ones_like(rows, dtype=torch.bool) if flat is None else flat != opts.ignore_index
    den_rows = valid.to(rows.dtype) if tw is None else valid.to(rows.dtype) * tw.to(rows.dtype)
    local = row_sums(rows, den_rows, valid, None, opts)  # the CE heads' one reduction (rows weighted above)
    if batch:  # the local sums over the batch-sharded mesh dims: one all-reduce of 4 numbers
        part = [Partial() if i in batch else Replicate() for i in range(mesh.ndim)]
        repl = [Replicate()] * mesh.ndim
        local = DTensor.from_local(local, mesh, part).redistribute(mesh, repl).to_local()
    loss = finish_sums(local, opts)
    return DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim)


# ------------------------------------------------------------------------------- linear forms
def head_locals(mesh: Any, batch: list, weight: "DTensor", bias: Any) -> tuple[Tensor, Any]:
    """This rank's head (and bias) shard; a head replicated over batch-sharded mesh dims saw only
    this rank's tokens: its gradient is summed over them in backward (``ReduceGradOver``)."""
    dp = [mesh.get_group(i) for i in batch]
    w = ReduceGradOver.apply(weight.to_local(), dp)
    return w, ReduceGradOver.apply(bias.to_local(), dp) if isinstance(bias, DTensor) else bias


def mesh_agreement(batch: list) -> dict:
    """What the TP group must agree on beyond the options: which mesh dims shard the tokens (a rank
    whose hidden states are placed otherwise would skip, or add, the loss's batch all-reduce)."""
    return dict(batch_mesh_dims=float(sum(1 << i for i in batch)))


def dtensor_linear_token_logprobs(input: Any, linear_weight: Any, target: Any, linear_bias: Any,
                                  temperature: float, return_entropy: bool, chunk_size: int,
                                  error: Optional[BaseException], local: Callable, softcap: float = 0.0,
                                  token_weight: Any = None, accum_fp32: bool = True,
                                  ignore_index: int = -100):
    """``linear_token_logprobs`` with DTensor hidden states and head (``core/dtensor.py``'s
    rules for the CE linear head): W ``Shard(0)`` on the TP mesh dim = vocabulary parallel there
    (``kl/parallel_linear.py``); outputs as ``dtensor_token_logprobs``'. ``error``: this rank's
    invalid option, raised on every rank of the TP group after the layout exchange; ``chunk_size``
    validated (0 = automatic). ``local``: the single-device ``linear_token_logprobs`` (no TP mesh
    dim: it runs on the local parts). ``ignore_index`` validated (agreed on by the TP group)."""
    what = "linear_token_logprobs on DTensors"
    mesh, tp, rows_pl, batch = head_plan(input, linear_weight, linear_bias, what)
    x, tok = input.to_local(), local_part(target)
    w, b = head_locals(mesh, batch, linear_weight, linear_bias)
    tw, error = parallel_token_weight(local_part(token_weight), x, error)
    if tp is None:
        # the head's gradient is summed over the batch dims in backward: no rank may raise alone
        agree_local(what, mesh, batch, KLOptions(ignore_index=ignore_index), error, tok,
                    linear_weight.shape[0], x, x.shape[:-1])
        res = local(x, w, tok, linear_bias=b, temperature=temperature, return_entropy=return_entropy,
                    ignore_index=ignore_index, softcap=softcap or None, chunk_size=chunk_size or None,
                    grad_accum_dtype=None if accum_fp32 else w.dtype)
    else:
        start = chunk_start(linear_weight.shape[0], mesh.size(tp), mesh.get_local_rank(tp))
        agree = dict(mesh_agreement(batch), **agree_token_weight(token_weight))
        res = vocab_parallel_linear_token_logprobs(x, w, tok, b, temperature, return_entropy,
                                                   mesh.get_group(tp), start, error, agree, chunk_size,
                                                   softcap, accum_fp32, ignore_index=ignore_index)
    outs = res if return_entropy else (res,)
    outs = weighted(tuple(o.reshape(-1) for o in outs), tw)
    shape = input.shape[:-1]
    outs = tuple(rows_dtensor(o, x.shape[:-1], mesh, rows_pl, shape) for o in outs)
    return outs if return_entropy else outs[0]


def teacher_locals(input: "DTensor", linear_weight: "DTensor", teacher_input: Any, teacher_linear_weight: Any,
                   teacher_linear_bias: Any, what: str) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The teacher's local (hidden, head, bias), constants; ValueError unless each is a DTensor
    placed as its student counterpart (student and teacher share one layout)."""
    pairs = [("teacher_input", teacher_input, input),
             ("teacher_linear_weight", teacher_linear_weight, linear_weight)]
    if teacher_linear_bias is not None:
        pairs.append(("teacher_linear_bias", teacher_linear_bias, linear_weight))
    for name, t, ref in pairs:
        if not isinstance(t, DTensor) or t.device_mesh != ref.device_mesh \
                or list(t.placements) != list(ref.placements):
            got = t.placements if isinstance(t, DTensor) else type(t).__name__
            raise ValueError(f"{what}: {name} must be a DTensor on the student's mesh placed as the "
                             f"student's {'hidden states' if ref is input else 'head'} ({ref.placements}), "
                             f"got {got}: student and teacher share one layout")
    bt = None if teacher_linear_bias is None else teacher_linear_bias.to_local().detach()
    return teacher_input.to_local().detach(), teacher_linear_weight.to_local().detach(), bt


def dtensor_linear_distillation_loss(input: Any, linear_weight: Any, teacher_input: Any,
                                     teacher_linear_weight: Any, target: Any, linear_bias: Any,
                                     teacher_linear_bias: Any, chosen: Optional[KLOptions],
                                     error: Optional[BaseException], local: Callable,
                                     token_weight: Any = None):
    """``linear_distillation_loss`` with DTensor hidden states and heads: the student head's
    placements decide (``dtensor_linear_token_logprobs``); the teacher's hidden states, head and
    bias must be placed as the student's (a teacher laid out otherwise on one rank raises on every
    rank of the TP group); the loss as ``dtensor_distillation_loss``'. The teacher is a constant.
    ``local``: the single-device ``linear_distillation_loss`` (no TP mesh dim); ``token_weight`` as
    ``dtensor_token_logprobs``'."""
    what = "linear_distillation_loss on DTensors"
    mesh, tp, rows_pl, batch = head_plan(input, linear_weight, linear_bias, what)
    ht = wt = bt = None
    try:
        ht, wt, bt = teacher_locals(input, linear_weight, teacher_input, teacher_linear_weight,
                                    teacher_linear_bias, what)
    except ValueError as e:
        error = error or e
    x, lbl = input.to_local(), local_part(target)
    w, b = head_locals(mesh, batch, linear_weight, linear_bias)
    tw, error = parallel_token_weight(local_part(token_weight), x, error)
    if tp is None:
        agree_local(what, mesh, batch, chosen, error, lbl, linear_weight.shape[0], x, x.shape[:-1])
        opts = chosen
        assert opts is not None  # else make_kl raised: error, raised on every rank above
        rows = local(x, w, ht, wt, lbl, linear_bias=b, teacher_linear_bias=bt, divergence=opts.divergence,
                     beta=opts.beta, temperature=opts.temperature, ignore_index=opts.ignore_index,
                     reduction="none", ce_weight=opts.ce_weight, softcap=opts.softcap or None,
                     chunk_size=opts.chunk_size or None,
                     grad_accum_dtype=None if opts.accum_fp32 else w.dtype)
        flat = None if lbl is None else lbl.reshape(-1)
    else:
        start = chunk_start(linear_weight.shape[0], mesh.size(tp), mesh.get_local_rank(tp))
        rows, flat = vocab_parallel_linear_distillation_rows(
            x, w, ht, wt, lbl, b, bt, chosen, mesh.get_group(tp), start, error, mesh_agreement(batch))
    assert chosen is not None  # else the calls above raised the error, on every rank
    return mesh_loss(rows.reshape(-1), flat, chosen, mesh, rows_pl, batch, x.shape[:-1], input.shape[:-1],
                     tw)
