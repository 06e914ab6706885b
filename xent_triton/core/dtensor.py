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
  per-call all_gather of ``core.exchange`` still checks that the options agree. Without a
  tensor-parallel dim, the options (and each rank's operand errors) are agreed on over the
  batch-sharded mesh dims (one all_gather of a few float64 per dim and call, ``agree_rows``):
  an option given on one rank only raises on every rank, none waits in the loss's reduction.
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

from .exchange import agree_over, exchange_device, flags, refuse_agreed
from .options import LossOptions
from .reduction import ce_row_sums, finish_sums, reduce_rows
from .runtime import is_compiling

if TYPE_CHECKING:
    from typing_extensions import TypeGuard


try:  # torch built without distributed: nothing is ever a DTensor
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None


def is_dtensor(t: Any) -> "TypeGuard[DTensor]":
    """True for a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def placement_layout_error(process_group: Any, vocab_start_index: Any, what: str) -> Optional[ValueError]:
    """The error for DTensor operands given a ``process_group`` or ``vocab_start_index`` too (their
    layout comes from the placements: the arguments would be ignored), or None; the caller raises
    it with its other local errors after the agreement, on every rank alike."""
    given = [n for n, v in (("process_group", process_group), ("vocab_start_index", vocab_start_index))
             if v is not None]
    if not given:
        return None
    return ValueError(f"{what}: {' and '.join(given)} with DTensor operands: their layout comes from the "
                      "placements (pass plain tensors for process_group)")


def local_part(t: Any) -> Any:
    """The local part of a DTensor (differentiable), anything else unchanged."""
    return t.to_local() if is_dtensor(t) else t


def full_tensor(t: Any) -> Any:
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


def head_plan(input: Any, linear_weight: Any, linear_bias: Any,
              what: str) -> tuple[Any, Optional[int], list, list[int]]:
    """(mesh, TP mesh dim or None, per-token output placements, batch-sharded mesh dims) of a
    linear head with DTensor operands (the module's rules): W ``Shard(0)`` on the TP dim, hidden
    states replicated there; raises for any other combination (a plain hidden with a DTensor W is
    an FSDP2 parameter read outside its module's forward). Used by the CE and the KL heads."""
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


def chunk_start(n: int, parts: int, index: int) -> int:
    """First element of chunk ``index`` when ``torch.chunk`` splits n into ``parts``."""
    return min(n, index * -(-n // parts))


def finish(loss_rows: Tensor, lse: Tensor, stats: Tensor, target: Tensor, opts: LossOptions, to_output,
           mesh: Any, rows_pl: list, batch: list[int], out_shape: tuple, return_lse: bool):
    """Reduce the per-row outputs of THIS rank's tokens over the whole mesh; DTensor results: the
    single device's reduction (``core.reduction``) with the row sums all-reduced in between."""
    repl = [Replicate()] * mesh.ndim
    stride = torch.empty(out_shape, device="meta").stride()

    def rows_dt(r: Tensor) -> "DTensor":
        return DTensor.from_local(r, mesh, rows_pl, shape=torch.Size(out_shape), stride=stride)

    if opts.reduction == "none" or not batch:
        loss = reduce_rows(loss_rows, lse, stats, target, opts, to_output)
        loss = rows_dt(loss) if opts.reduction == "none" else DTensor.from_local(loss, mesh, repl)
    else:  # the local row sums, summed over the batch-sharded mesh dims: one all-reduce of 4 numbers
        local = ce_row_sums(loss_rows, lse, stats, target, opts)
        part = [Partial() if i in batch else Replicate() for i in range(mesh.ndim)]
        summed = DTensor.from_local(local, mesh, part).redistribute(mesh, repl).to_local()
        loss = DTensor.from_local(finish_sums(summed, opts), mesh, repl)
    return (loss, rows_dt(to_output(lse))) if return_lse else loss


def agree_rows(what: str, mesh: Any, batch: list[int], agree: dict, unsupported: Optional[dict],
               local_error: Optional[BaseException], hint: Any) -> None:
    """Without a vocabulary-parallel dim: the options agreement over the batch-sharded mesh dims
    (``exchange.agree_over``, one all_gather of a few float64 per dim and one host read: their
    ranks meet again in the loss's reduction and the weight-gradient all-reduce, so a rank that
    raised alone would leave them waiting there), then the refused options, alike on every rank.
    ``local_error``: this rank's invalid option or operand. No batch-sharded dim: no exchange."""
    agree = dict(agree, **flags(unsupported))
    groups = [mesh.get_group(i) for i in batch]
    device = exchange_device(groups[0], hint) if groups else torch.device("cpu")
    run = torch.compiler.disable(agree_over) if is_compiling() else agree_over  # collectives: eager
    run(groups, device, agree, what, local_error)
    refuse_agreed(what, unsupported)
