"""``linear_cross_entropy`` with a DTensor head: the layout read from the placements (rules:
``core/dtensor.py``).
"""
from __future__ import annotations

from typing import Any, Optional

from ..core.dtensor import (
    Partial,
    agree_rows,
    chunk_start,
    finish,
    full_tensor,
    head_plan,
    is_dtensor,
    local_part,
)
from ..core.exchange import ReduceGradOver, agreement
from ..core.inputs import autocast_operands, check_linear_operands, check_weight, class_ids
from ..core.options import LossOptions, check_chunking
from ..core.runtime import compute_dtype
from ..linear.ops import linear_cross_entropy_rows
from .parallel import vocab_parallel_linear_rows


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

    ``chunk_size`` / ``grad_accum_dtype`` are validated on every rank and agreed on (over the
    vocabulary-parallel mesh dim, else the batch-sharded ones; ``options_error``: this rank's
    invalid option, raised after the agreement, on every rank alike).
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
    tgt, w = local_part(target), full_tensor(weight)
    if tp is not None:
        start = chunk_start(linear_weight.shape[0], mesh.size(tp), mesh.get_local_rank(tp))
        flat, loss_rows, lse, stats = vocab_parallel_linear_rows(
            x, W, tgt, b, w, opts, return_lse=return_lse, process_group=mesh.get_group(tp),
            vocab_start_index=start, reduce_input_grad=reduce_input_grad, allow_empty=True,
            options_error=options_error, unsupported=unsupported, chunk_size=chunk_size,
            grad_accum_dtype=grad_accum_dtype)
    else:
        local_error, chunk, accum_fp32, w_rows = options_error, 0, True, None
        try:  # this rank's operand errors join the agreement: raised on every rank alike
            x, W, b = autocast_operands(x, W, b)
            check_linear_operands(x, W, b, tgt)
            # the per-token path: no dW accumulation across token chunks (one GEMM per vocabulary
            # split); chunk_size sizes the splits
            chunk, accum_fp32 = check_chunking(chunk_size, grad_accum_dtype, W.dtype)
            flat = class_ids(tgt, x.shape[:-1], "input's leading shape")
            w_rows = check_weight(w, W.shape[0], x.device, x.dtype)
        except (TypeError, ValueError, IndexError) as e:
            local_error = local_error or e
        agree = agreement(w, opts, bias=float(b is not None), return_lse=float(return_lse), chunk_size=chunk,
                          grad_accum_fp32=float(accum_fp32))
        agree_rows(what, mesh, batch, agree, unsupported, local_error, x)
        loss_rows, lse, stats = linear_cross_entropy_rows(
            x.reshape(-1, W.shape[1]), W, b.contiguous() if b is not None else None, flat, w_rows, opts,
            skip_ignored=not return_lse and opts.lse_square_scale == 0, chunk_size=chunk)
    out_shape = tuple(input.shape[:-1])
    return finish(loss_rows, lse.to(compute_dtype(x)), stats, flat, opts, lambda r: r.view(tgt.shape), mesh,
                  rows_pl, batch, out_shape, return_lse)
