"""The vocabulary shard of this rank, agreed on by every rank of the group in the same collective.

Every call performs exactly one ``all_gather`` of a few float64 per rank (the local class count,
the given start, and a signature of the options that must agree), entered unconditionally by
every rank: whether a rank enters a collective never depends on per-rank state (there is no
cache), so ranks can never wait in different collectives. The table read back costs one host
sync per call. Any disagreement raises the same ValueError on every rank (all read the same table).
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .runtime import compute_dtype

IGNORED = -1  # localized target of an ignored row (what the kernels get as ignore_index)
FOREIGN = -2  # localized target of a row whose class lives in another shard (or out of range)
NOT_GIVEN = -(2.0 ** 52)  # vocab_start_index=None in the gathered table


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """This rank's contiguous class range [start, start + size) of an ``n_classes`` vocabulary."""
    start: int
    size: int
    n_classes: int
    rank: int
    world_size: int


def _number(v) -> float:
    """A plain number for the agreement table (symbolic values under torch.compile count as 0)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return 0.0
    return f if math.isfinite(f) else 0.0


def check_agreement(rows: list[list[float]], names: tuple[str, ...], what: str) -> None:
    """Every rank's (failed, *agreement values): the same ValueError on every rank (all read the
    same table) when a rank failed its own validation or a value differs across the ranks."""
    failed = [i for i, r in enumerate(rows) if r[0] != 0]
    if failed:
        raise ValueError(f"{what}: invalid inputs on group rank(s) {failed} (raised there with the reason); "
                         "no rank enters the loss's collectives")
    for i, name in enumerate(names):
        vals = [r[1 + i] for r in rows]
        if len(set(vals)) != 1:
            raise ValueError(f"{what}: '{name}' differs across the ranks of the process group "
                             f"(by group rank: {vals}); every rank must pass the same value")


def gather_rows(group: Any, device: torch.device, values: list[float]) -> list[list[float]]:
    """Every rank's ``values`` (float64), by group rank: one all_gather and one host read."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    return torch.stack(table).cpu().tolist()


def agree_over(groups: list, device: torch.device, agree: dict, what: str,
               local_error: Optional[BaseException] = None) -> None:
    """The options agreement where no vocabulary layout is exchanged (a DTensor whose rows are
    sharded and whose classes are not): one all_gather of (failed, *agree values) per group, in
    turn, a failure seen in one carried into the next, so that every rank of their union raises
    (its own ``local_error``, else ValueError) and none is left waiting in the loss's collectives."""
    error: Optional[BaseException] = None
    names = tuple(agree)
    for group in groups:
        failed = local_error is not None or error is not None
        rows = gather_rows(group, device, [float(failed)] + [_number(agree[k]) for k in names])
        try:
            check_agreement(rows, names, what)
        except ValueError as e:
            error = error or e
    if local_error is not None:
        raise local_error
    if error is not None:
        raise error


def layout_from_table(rows: list[list[float]], rank: int, names: tuple[str, ...], what: str,
                      allow_empty: bool = False) -> VocabShard:
    """Shard of ``rank`` from every rank's (C_local, start or NOT_GIVEN, failed, *agreement values);
    raises the same ValueError on every rank (all see the same table). ``allow_empty``: ranks
    with no class are fine (DTensor shards follow ``torch.chunk``: C = 5 over 4 ranks leaves one
    empty), as long as some rank holds a class."""
    check_agreement([r[2:] for r in rows], names, what)
    sizes = [int(r[0]) for r in rows]
    starts = [r[1] for r in rows]
    if min(sizes) < 0 or sum(sizes) < 1 or (min(sizes) < 1 and not allow_empty):
        raise ValueError(f"{what}: every rank must hold at least one class; local class counts by "
                         f"group rank: {sizes}")
    if all(s == NOT_GIVEN for s in starts):
        starts = [sum(sizes[:i]) for i in range(len(sizes))]  # contiguous in group-rank order
    elif any(s == NOT_GIVEN for s in starts):
        raise ValueError(f"{what}: vocab_start_index must be given on every rank of the group or on none; "
                         f"got {[None if s == NOT_GIVEN else int(s) for s in starts]}")
    starts = [int(s) for s in starts]
    n = sum(sizes)
    ranges = sorted((a, b) for a, b in zip(starts, sizes) if b > 0)
    ends = [a + b for a, b in ranges]
    if ranges[0][0] != 0 or any(ends[i] != ranges[i + 1][0] for i in range(len(ranges) - 1)):
        raise ValueError(f"{what}: the shards do not tile [0, {n}) exactly: (start, size) by group "
                         f"rank = {list(zip(starts, sizes))}")
    return VocabShard(starts[rank], sizes[rank], n, rank, len(sizes))


def vocab_shard(group: Any, local_size: int, device: torch.device, vocab_start_index: Optional[int],
                agree: dict, what: str, allow_empty: bool = False,
                local_error: Optional[BaseException] = None) -> VocabShard:
    """This rank's shard of the vocabulary of ``group`` (one all_gather, every call, every rank).

    ``agree``: name -> value of every option that must be equal on all ranks (the global class
    weights' length, the reduction, smoothing, softcap, ...); a mismatch raises on every rank.
    Layout: ``vocab_start_index=None`` on every rank = shards in group-rank order (Megatron's
    layout, unequal sizes allowed); else the given starts must tile [0, C_global).
    ``allow_empty``: a rank may hold no class (what a DTensor's ``torch.chunk`` layout produces).
    ``local_error``: this rank's own input validation failed (raised before any collective it
    would hang the others): it still enters the exchange, then re-raises its error while every
    other rank raises a ValueError naming it.
    Cost: one all_gather of (3 + len(agree)) float64 per rank and one host read of the table.

    Example:
        >>> shard = vocab_shard(tp_group, 12565, torch.device("cuda"), None, {"reduction": 1.0}, "loss")
        >>> shard.start, shard.size, shard.n_classes   # on rank 1 of 4 for C = 50257
        (12565, 12565, 50257)
    """
    if group is None:
        raise ValueError(f"{what} needs a process_group (None means: not vocabulary-parallel)")
    start = NOT_GIVEN if vocab_start_index is None else float(vocab_start_index)
    names = tuple(agree)
    rows = gather_rows(group, device, [float(local_size), start, float(local_error is not None)]
                       + [_number(agree[k]) for k in names])
    if local_error is not None:
        raise local_error
    return layout_from_table(rows, dist.get_rank(group), names, what, allow_empty)


def exchange_device(group: Any, hint: Any) -> torch.device:
    """Where the layout exchange runs: ``hint``'s device when it is a tensor, else CUDA for NCCL."""
    if isinstance(hint, Tensor):
        return hint.device
    backend = str(dist.get_backend(group)) if group is not None else ""
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


class ReduceGradOver(torch.autograd.Function):
    """Identity forward; backward: the gradient summed over each group of ``groups`` (an all-reduce
    of a copy in the compute dtype: fp32 for 16-bit gradients, float64 for float64; one cast back).

    The input gradient of a class-sharded head (every shard's logits read the same hidden states:
    Megatron's ``copy_to_tensor_model_parallel_region``), and the data-parallel gradient of a head
    replicated over batch-sharded mesh dims (``core/dtensor.py``). No group: the identity."""

    @staticmethod
    def forward(ctx, t: Tensor, groups: list) -> Tensor:
        ctx.groups = list(groups)
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: Tensor):
        if not ctx.groups:
            return g, None
        acc = g.to(dtype=compute_dtype(g), memory_format=torch.contiguous_format, copy=True)
        for group in ctx.groups:
            dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=group)
        return acc.to(g.dtype), None


def localize_target(target: Tensor, shard: VocabShard, ignore_index: int) -> Tensor:
    """Global class ids (int64) -> shard-local ids: id - start inside the shard, ``IGNORED`` for
    ignore_index, ``FOREIGN`` otherwise (another shard's class, or out of range). A shard-local id
    may equal the user's ignore_index without harm: the kernels only ever see ``IGNORED``."""
    local = target - shard.start
    owned = (local >= 0) & (local < shard.size)
    out = torch.where(owned, local, torch.full_like(local, FOREIGN))
    return torch.where(target == ignore_index, torch.full_like(local, IGNORED), out)


def option_code(v: Any) -> float:
    """A field of ``LossOptions.flat()`` as a number of the agreement table: a string by its CRC-32
    (the same on every process, unlike ``hash``), None as ``NOT_GIVEN``, a number as itself."""
    if isinstance(v, str):
        return float(zlib.crc32(v.encode()))
    return NOT_GIVEN if v is None else v


def agreement(weight: Any, opts: Any, **extra: float) -> dict:
    """name -> number of every option that must be the same on all ranks (``vocab_shard``'s
    ``agree``): the class weights' length (-1: none), every field of ``opts`` (a ``LossOptions``,
    by ``flat()``: a field added there joins the agreement), plus ``extra``."""
    wl = -1 if weight is None else (weight.numel() if isinstance(weight, Tensor) else -2)
    return dict(weight_length=wl, **{k: option_code(v) for k, v in opts.flat().items()}, **extra)


def flags(unsupported: Optional[dict]) -> dict:
    """Agreement entries (0 / 1) of the options a path refuses (``return_stats``, ``token_weight``):
    given on one rank only, they differ across ranks and every rank raises the same ValueError."""
    return {k: float(v is not None and v is not False) for k, v in (unsupported or {}).items()}


def refuse_agreed(what: str, unsupported: Optional[dict]) -> None:
    """After the agreement (so on every rank alike): NotImplementedError naming refused options."""
    bad = [k for k, v in flags(unsupported).items() if v]
    if bad:
        raise NotImplementedError(f"{what}: {', '.join(bad)} not supported with a process_group or DTensor")
