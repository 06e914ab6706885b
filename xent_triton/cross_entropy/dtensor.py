"""``cross_entropy`` of DTensor logits: the layout read from the placements (rules: ``core/dtensor.py``).
"""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from ..core.dtensor import DTensor, agree_rows, chunk_start, finish, full_tensor, local_part, plan
from ..core.exchange import agreement
from ..core.inputs import canonical, check_weight
from ..core.options import LossOptions
from ..core.runtime import compute_dtype
from ..cross_entropy.ops import cross_entropy_rows
from .parallel import vocab_parallel_rows


def dtensor_cross_entropy(input: "DTensor", target: Any, weight: Any, opts: LossOptions, *,
                          inplace_backward: bool = False, return_lse: bool = False,
                          unsupported: Optional[dict] = None, options_error: Optional[BaseException] = None):
    """``cross_entropy`` of DTensor logits (N, C, ...) / (C): see the module's rules.

    Example:
        >>> mesh = init_device_mesh("cuda", (4,))
        >>> logits = distribute_tensor(full_logits, mesh, [Shard(1)])   # (N, C) sharded on C
        >>> loss = xent_triton.cross_entropy(logits, y)   # a replicated DTensor; grad: Shard(1)

    ``unsupported``: options refused here (``return_stats``, ``token_weight``): they join the
    options agreement first (the vocabulary-parallel dim's, else the batch-sharded dims'), as does
    ``options_error`` (this rank's invalid option): no rank raises alone. ``inplace_backward``:
    the gradient is written over this rank's local shard of the logits (the caller has refused
    leaves).
    """
    what = "cross_entropy on a DTensor"
    class_dim = 0 if input.dim() == 1 else 1
    tp, rows_pl, batch = plan(input, class_dim, what)
    mesh, tgt = input.device_mesh, local_part(target)
    x, w = input.to_local(), full_tensor(weight)
    C = input.shape[class_dim]
    if tp is not None:
        start = chunk_start(C, mesh.size(tp), mesh.get_local_rank(tp))
        can, loss_rows, lse, stats = vocab_parallel_rows(
            x, tgt, w, opts, inplace_backward=inplace_backward, return_lse=return_lse,
            process_group=mesh.get_group(tp), vocab_start_index=start, allow_empty=True,
            options_error=options_error, unsupported=unsupported)
    else:
        can, w_rows, local_error = None, None, options_error
        try:  # this rank's operand errors join the agreement: raised on every rank alike
            can = canonical(x, tgt)
            w_rows = check_weight(w, C, x.device, x.dtype)
        except (TypeError, ValueError, IndexError) as e:
            local_error = local_error or e
        soft = isinstance(tgt, Tensor) and tgt.is_floating_point()
        agree = agreement(w, opts, return_lse=float(return_lse), soft_target=float(soft))
        agree_rows(what, mesh, batch, agree, unsupported, local_error, x)
        loss_rows, lse, stats = cross_entropy_rows(can.x3, can.target, w_rows, opts, inplace_backward)[:3]
    out_shape = tuple(input.shape[:class_dim] + input.shape[class_dim + 1:])
    return finish(loss_rows, lse.to(compute_dtype(x)), stats, can.target, opts, can.rows_to_output, mesh,
                  rows_pl, batch, out_shape, return_lse)
