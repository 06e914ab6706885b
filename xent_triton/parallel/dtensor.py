"""DTensor inputs: ``cross_entropy`` / ``linear_cross_entropy`` read the layout from the placements.

Rules (docs/distributed.md, "DTensor"):

* ``cross_entropy(logits)``, logits a DTensor: a mesh dim with ``Shard(class dim)`` (``Shard(-1)``
  / ``Shard(1)`` for (N, C)) is the tensor-parallel dim: the vocabulary-parallel path runs on
  ``mesh.get_group(that dim)``. ``Shard`` of a batch dim on another mesh dim = those ranks hold
  other tokens (data parallel inside the mesh). ``Replicate`` everywhere = the local path.
* ``linear_cross_entropy(hidden, W)``: W a DTensor ``Shard(0)`` on mesh dim k AND hidden a DTensor
  on the same mesh, ``Replicate`` on k (TP's ``ColwiseParallel`` output layer) = vocabulary
  parallel on ``mesh.get_group(k)``. A ``Shard(0)`` W with a PLAIN hidden tensor is an FSDP2
  parameter read outside its module's forward, never TP: it raises (compute the loss inside the
  module's forward, where FSDP has unsharded W: ``parallel.FusedLMHead``).
* Shards follow ``torch.chunk`` (C = 50257 over 4: 12565 x 3 + 12562; C = 5 over 4 leaves a rank
  with no class: supported). The layout comes from the DTensor (no start is guessed); the one
  per-call all_gather of ``parallel.layout`` still checks that the options agree.
* Returned loss (and lse): a DTensor on the input's mesh. ``mean`` / ``sum``: ``Replicate`` on
  every mesh dim, the loss over ALL tokens of the mesh (batch-sharded dims: one all-reduce of 4
  numbers). ``none``: the per-token losses, ``Shard`` on the batch dims as the input, ``Replicate``
  on the TP dim. Gradients come back with the placements of the inputs (``to_local``'s backward);
  a head weight / bias replicated over a batch-sharded mesh dim gets its gradient summed over it
  (one all-reduce of its local shard in backward, the data-parallel gradient reduction).
* Targets: a DTensor (its local part is used) or a plain tensor holding THIS rank's tokens' GLOBAL
  class ids (the whole target when the batch is not sharded). Class weights: plain or replicated.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from ..cross_entropy.ops import cross_entropy_rows
from ..linear.ops import linear_cross_entropy_rows
from ..options import (
    LossOptions,
    autocast_operands,
    canonical,
    check_chunking,
    check_linear_operands,
    check_weight,
    class_ids,
    reduce_rows,
)
from ..runtime import compute_dtype
from .cross_entropy import vocab_parallel_rows
from .layout import ReduceGradOver, flags, refuse_agreed
from .linear import vocab_parallel_linear_rows

if TYPE_CHECKING:
    from typing_extensions import TypeGuard

try:  # torch built without distributed: nothing is ever a DTensor
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None


def is_dtensor(t: Any) -> "TypeGuard[DTensor]":
    """True for a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: Any) -> Any:
    """The local part of a DTensor (differentiable), anything else unchanged."""
    return t.to_local() if is_dtensor(t) else t


def _full(t: Any) -> Any:
    """A replicated / plain tensor in full (class weights)."""
    return t.full_tensor() if is_dtensor(t) else t


def plan(t: "DTensor", class_dim: Optional[int], what: str) -> tuple[Optional[int], list, list[int]]:
    """(TP mesh dim or None, placements of the per-token outputs, batch-sharded mesh dims).

    ``class_dim``: the dim whose sharding means vocabulary parallelism (None: sharding it is an
    error, e.g. the hidden dim of the linear head's input). Per-token outputs drop that dim."""
    nd, tp, rows, batch = t.dim(), None, [], []
    drop = class_dim if class_dim is not None else nd - 1
    for i, p in enumerate(t.placements):
        if isinstance(p, Replicate):
            rows.append(Replicate())
        elif isinstance(p, Shard) and p.dim % nd == drop:
            if class_dim is None:
                raise ValueError(f"{what}: the hidden states are sharded on the hidden dim (mesh dim {i}); "
                                 "replicate them over the tensor-parallel mesh dim")
            if tp is not None:
                raise ValueError(f"{what}: the class dim is sharded over two mesh dims ({tp} and {i})")
            tp = i
            rows.append(Replicate())
        elif isinstance(p, Shard):
            d = p.dim % nd
            batch.append(i)
            rows.append(Shard(d if d < drop else d - 1))
        else:
            raise ValueError(f"{what}: placement {p} on mesh dim {i} is not supported (Partial values: "
                             "reduce them first)")
    return tp, rows, batch


def _chunk_start(n: int, parts: int, index: int) -> int:
    """First element of chunk ``index`` when ``torch.chunk`` splits n into ``parts``."""
    return min(n, index * -(-n // parts))


def finish(loss_rows: Tensor, lse: Tensor, stats: Tensor, target: Tensor, opts: LossOptions, to_output,
           mesh: Any, rows_pl: list, batch: list[int], out_shape: tuple, return_lse: bool):
    """Reduce the per-row outputs of THIS rank's tokens over the whole mesh; DTensor results."""
    repl = [Replicate()] * mesh.ndim
    stride = torch.empty(out_shape, device="meta").stride()

    def rows_dt(r: Tensor) -> "DTensor":
        return DTensor.from_local(r, mesh, rows_pl, shape=torch.Size(out_shape), stride=stride)

    if opts.reduction == "none" or not batch:
        loss = reduce_rows(loss_rows, lse, stats, target, opts, to_output)
        loss = rows_dt(loss) if opts.reduction == "none" else DTensor.from_local(loss, mesh, repl)
    else:  # the local sums, summed over the batch-sharded mesh dims: one all-reduce of 4 numbers
        soft = target.is_floating_point()
        valid = torch.ones_like(lse, dtype=torch.bool) if soft else target != opts.ignore_index
        zrows = opts.lse_square_scale * torch.where(valid, lse, torch.zeros_like(lse)) ** 2
        den = (valid.to(lse.dtype) if soft else stats[:, 2].to(lse.dtype)).sum()
        local = torch.stack([loss_rows.sum(), den, zrows.sum(), valid.sum().to(lse.dtype)])
        part = [Partial() if i in batch else Replicate() for i in range(mesh.ndim)]
        summed = DTensor.from_local(local, mesh, part).redistribute(mesh, repl).to_local()
        ce, den, z, n_valid = summed.unbind()
        if opts.reduction == "sum":
            loss = ce + z
        else:
            if opts.empty_batch == "zero":
                den = torch.where(den == 0, torch.ones_like(den), den)
                n_valid = torch.where(n_valid == 0, torch.ones_like(n_valid), n_valid)
            loss = ce / den + (z / n_valid if opts.lse_square_scale != 0 else 0.0)
        loss = DTensor.from_local(loss, mesh, repl)
    return (loss, rows_dt(to_output(lse))) if return_lse else loss


def refuse_local(what: str, unsupported: Optional[dict], options_error: Optional[BaseException]) -> None:
    """Without a vocabulary-parallel dim (no agreement collective to join): raise this rank's
    invalid option, then refuse unsupported ones."""
    if options_error is not None:
        raise options_error
    if any(flags(unsupported).values()):
        refuse_agreed(what, unsupported)


def dtensor_cross_entropy(input: "DTensor", target: Any, weight: Any, opts: LossOptions, *,
                          inplace_backward: bool = False, return_lse: bool = False,
                          unsupported: Optional[dict] = None, options_error: Optional[BaseException] = None):
    """``cross_entropy`` of DTensor logits (N, C, ...) / (C): see the module's rules.

    Example:
        >>> mesh = init_device_mesh("cuda", (4,))
        >>> logits = distribute_tensor(full_logits, mesh, [Shard(1)])   # (N, C) sharded on C
        >>> loss = xent_triton.cross_entropy(logits, y)   # a replicated DTensor; grad: Shard(1)

    ``unsupported``: options refused here (``return_stats``, ``token_weight``): with a
    vocabulary-parallel mesh dim they join its options agreement first (no rank raises alone), as
    does ``options_error`` (this rank's invalid option). ``inplace_backward``: the gradient is
    written over this rank's local shard of the logits (the caller has refused leaves).
    """
    what = "cross_entropy on a DTensor"
    class_dim = 0 if input.dim() == 1 else 1
    tp, rows_pl, batch = plan(input, class_dim, what)
    mesh, tgt = input.device_mesh, _local(target)
    x, w = input.to_local(), _full(weight)
    C = input.shape[class_dim]
    if tp is not None:
        start = _chunk_start(C, mesh.size(tp), mesh.get_local_rank(tp))
        can, loss_rows, lse, stats = vocab_parallel_rows(
            x, tgt, w, opts, inplace_backward=inplace_backward, return_lse=return_lse,
            process_group=mesh.get_group(tp), vocab_start_index=start, allow_empty=True,
            options_error=options_error, unsupported=unsupported)
    else:
        refuse_local(what, unsupported, options_error)
        can = canonical(x, tgt)
        loss_rows, lse, stats = cross_entropy_rows(can.x3, can.target, check_weight(w, C, x.device, x.dtype),
                                                   opts, inplace_backward)[:3]
    out_shape = tuple(input.shape[:class_dim] + input.shape[class_dim + 1:])
    return finish(loss_rows, lse.to(compute_dtype(x)), stats, can.target, opts, can.rows_to_output, mesh,
                  rows_pl, batch, out_shape, return_lse)


def head_plan(input: Any, linear_weight: Any, linear_bias: Any,
              what: str) -> tuple[Any, Optional[int], list, list[int]]:
    """(mesh, TP mesh dim or None, per-token output placements, batch-sharded mesh dims) of a
    linear head with DTensor operands (the module's rules): W ``Shard(0)`` on the TP dim, hidden
    states replicated there; raises for any other combination (a plain hidden with a DTensor W is
    an FSDP2 parameter read outside its module's forward)."""
    if not is_dtensor(input):
        raise TypeError(
            f"{what}: linear_weight is a DTensor ({linear_weight.placements}) but the hidden states are "
            "a plain tensor. A Shard(0) weight read outside its module's forward is an FSDP2 parameter "
            "still sharded (never tensor parallelism): compute the loss inside the FSDP-wrapped "
            "module's forward, where the weight is unsharded (xent_triton.parallel.FusedLMHead). For "
            "tensor parallelism pass the hidden states as a DTensor on the weight's mesh.")
    if not is_dtensor(linear_weight):
        raise TypeError(f"{what}: the hidden states are a DTensor but linear_weight is a plain tensor; "
                        "make the weight a DTensor on the same mesh (Replicate, or Shard(0) for TP)")
    mesh = input.device_mesh
    if linear_weight.device_mesh != mesh or (is_dtensor(linear_bias) and linear_bias.device_mesh != mesh):
        raise ValueError(f"{what}: the hidden states, the weight and the bias must be on the same mesh")
    tp = None
    for i, p in enumerate(linear_weight.placements):
        if isinstance(p, Shard) and p.dim % 2 == 0:
            tp = i
        elif not isinstance(p, Replicate):
            raise ValueError(f"{what}: linear_weight placement {p} on mesh dim {i}: only Shard(0) (the "
                             "vocabulary) and Replicate are supported")
    _, rows_pl, batch = plan(input, None, what)
    if tp is not None and tp in batch:
        raise ValueError(f"{what}: the hidden states must be replicated over the vocabulary-parallel mesh "
                         f"dim {tp}")
    if is_dtensor(linear_bias) and list(linear_bias.placements) != list(linear_weight.placements):
        raise ValueError(f"{what}: the bias must be placed like the weight ({linear_weight.placements})")
    return mesh, tp, rows_pl, batch


def dtensor_linear_cross_entropy(input: Any, linear_weight: Any, target: Any, linear_bias: Any,
                                 weight: Any, opts: LossOptions, *, return_lse: bool = False,
                                 reduce_input_grad: bool = True, unsupported: Optional[dict] = None,
                                 options_error: Optional[BaseException] = None,
                                 chunk_size: Optional[int] = None, grad_accum_dtype: Any = None):
    """``linear_cross_entropy`` when the hidden states and/or the head weight are DTensors.

    Example:
        >>> mesh = init_device_mesh("cuda", (4,))
        >>> W = distribute_tensor(full_W, mesh, [Shard(0)])        # ColwiseParallel head
        >>> h = distribute_tensor(hidden, mesh, [Replicate()])
        >>> loss = xent_triton.linear_cross_entropy(h, W, y)       # vocabulary parallel

    ``chunk_size`` / ``grad_accum_dtype`` are validated on every rank and, on a vocabulary-parallel
    mesh dim, agreed on (``options_error``: this rank's invalid option, raised after the agreement).
    """
    what = "linear_cross_entropy on DTensors"
    mesh, tp, rows_pl, batch = head_plan(input, linear_weight, linear_bias, what)
    # W / b replicated over a batch-sharded mesh dim saw only this rank's tokens: their gradient is
    # summed over that dim in backward (one all-reduce of the local shard, the data-parallel
    # gradient reduction), so that it comes back with W's own placements; the input's gradient
    # left unreduced over the TP dim (reduce_input_grad=False) is Partial there
    x_grad = [Partial() if i == tp and not reduce_input_grad else p for i, p in enumerate(input.placements)]
    x = input.to_local(grad_placements=x_grad)
    dp_groups = [mesh.get_group(i) for i in batch]
    W = ReduceGradOver.apply(linear_weight.to_local(), dp_groups)
    b = ReduceGradOver.apply(linear_bias.to_local(), dp_groups) if is_dtensor(linear_bias) else linear_bias
    tgt, w = _local(target), _full(weight)
    if tp is not None:
        start = _chunk_start(linear_weight.shape[0], mesh.size(tp), mesh.get_local_rank(tp))
        flat, loss_rows, lse, stats = vocab_parallel_linear_rows(
            x, W, tgt, b, w, opts, return_lse=return_lse, process_group=mesh.get_group(tp),
            vocab_start_index=start, reduce_input_grad=reduce_input_grad, allow_empty=True,
            options_error=options_error, unsupported=unsupported, chunk_size=chunk_size,
            grad_accum_dtype=grad_accum_dtype)
    else:
        refuse_local(what, unsupported, options_error)
        x, W, b = autocast_operands(x, W, b)
        check_linear_operands(x, W, b, tgt)
        chunk, _ = check_chunking(chunk_size, grad_accum_dtype, W.dtype)  # per-token path: no dW
        # accumulation across token chunks (one GEMM per vocabulary split), chunk sizes the splits
        flat = class_ids(tgt, x.shape[:-1], "input's leading shape")
        C, D = W.shape
        loss_rows, lse, stats = linear_cross_entropy_rows(
            x.reshape(-1, D), W, b.contiguous() if b is not None else None, flat,
            check_weight(w, C, x.device, x.dtype), opts,
            skip_ignored=not return_lse and opts.lse_square_scale == 0, chunk_size=chunk)
    out_shape = tuple(input.shape[:-1])
    return finish(loss_rows, lse.to(compute_dtype(x)), stats, flat, opts, lambda r: r.view(tgt.shape), mesh,
                  rows_pl, batch, out_shape, return_lse)
