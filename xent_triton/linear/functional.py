"""Public API of the fused linear cross-entropy: ``linear_cross_entropy`` and ``LinearCrossEntropyLoss``.

``linear_cross_entropy(h, W, y, ...)`` equals ``F.cross_entropy(F.linear(h, W, b), y, ...)`` (plus
the core's extras) without ever materialising the N×C logits; see
``linear/kernels.py`` for the algorithm and its FLOP / byte / memory budget.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union, cast, overload

import torch
from torch import Tensor

from ..core.dtensor import is_dtensor, placement_layout_error
from ..core.inputs import (
    Canonical,
    autocast_operands,
    check_linear_operands,
    check_token_weight,
    check_weight,
    class_ids,
    single_device_layout,
)
from ..core.options import check_chunking, make_options
from ..core.reduction import loss_stats, reduce_rows
from ..core.runtime import compute_dtype
from .dispatch import requested_path, use_fused
from .dtensor import dtensor_linear_cross_entropy
from .fused_head import fused_head
from .ops import linear_cross_entropy_rows, linear_cross_entropy_scalar, stats_rows
from .parallel import vocab_parallel_linear_cross_entropy


# Typing only: the loss alone without return_lse / return_stats, else the loss or the tuple (Returns).
@overload
def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Optional[Tensor] = ..., weight: Optional[Tensor] = ...,
                         ignore_index: int = ..., reduction: str = ..., label_smoothing: float = ...,
                         lse_square_scale: float = ..., softcap: Optional[float] = ...,
                         logit_scale: float = ..., return_lse: Literal[False] = ..., process_group: Any = ...,
                         vocab_start_index: Optional[int] = ..., reduce_input_grad: bool = ...,
                         empty_batch: str = ..., chunk_size: Optional[int] = ...,
                         grad_accum_dtype: Optional[torch.dtype] = ..., return_stats: Literal[False] = ...,
                         return_predicted: bool = ..., token_weight: Optional[Tensor] = ...) -> Tensor: ...
@overload
def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Optional[Tensor] = ..., weight: Optional[Tensor] = ...,
                         ignore_index: int = ..., reduction: str = ..., label_smoothing: float = ...,
                         lse_square_scale: float = ..., softcap: Optional[float] = ...,
                         logit_scale: float = ..., return_lse: bool = ..., process_group: Any = ...,
                         vocab_start_index: Optional[int] = ..., reduce_input_grad: bool = ...,
                         empty_batch: str = ..., chunk_size: Optional[int] = ...,
                         grad_accum_dtype: Optional[torch.dtype] = ..., return_stats: bool = ...,
                         return_predicted: bool = ..., token_weight: Optional[Tensor] = ...,
                         ) -> Union[Tensor, tuple[Any, ...]]: ...
def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                         softcap: Optional[float] = None, logit_scale: float = 1.0,
                         return_lse: bool = False, process_group: Any = None,
                         vocab_start_index: Optional[int] = None,
                         reduce_input_grad: bool = True,
                         empty_batch: str = "nan", chunk_size: Optional[int] = None,
                         grad_accum_dtype: Optional[torch.dtype] = None, return_stats: bool = False,
                         return_predicted: bool = False, token_weight: Optional[Tensor] = None,
                         ) -> Union[Tensor, tuple[Any, ...]]:
    """Cross-entropy of the logits ``input @ linear_weight.T + linear_bias``, fused.

    Equals ``cross_entropy(F.linear(input, linear_weight, linear_bias), target, weight, ...)`` of
    this package (same options, same formulas) but the (N, C) logits never exist at once.

    Algorithms (docs/performance.md): with a scalar upstream gradient (``reduction`` mean / sum,
    no ``return_lse``) and a gradient to compute, token chunks of ``chunk_size`` rows on the
    vendor GEMMs form the gradients in the forward pass (6 N D C FLOPs; one (chunk_size, C)
    workspace); otherwise the fused partials kernel gives the loss (2 N D C, no workspace) and
    backward recomputes the logits by vocabulary splits (8 N D C in all). No atomics.
    ``XENT_LINEAR_PATH=fused`` (or ``linear/dispatch.linear_path``) forces the fused-epilogue
    GEMM head instead (no host sync; ``auto`` picks it only where the GPU script's dispatch table
    measured it faster), ``vendor`` the default head.

    Args:
        input: hidden states (..., D), float16 / bfloat16 / float32 (float64 and CPU tensors
            without ``TRITON_INTERPRET=1`` run a chunked pure-torch path); any strides.
        linear_weight: (C, D) classifier, same dtype and device as ``input`` (under
            ``torch.autocast`` both are cast to the autocast dtype, as ``F.linear`` does).
        target: int64/int32/uint8 class ids of shape ``input.shape[:-1]``.
        linear_bias: optional (C,) bias, same dtype as ``input``.
        weight, ignore_index, reduction, label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        lse_square_scale: z-loss scale zl: adds zl * lse**2 per non-ignored token (``mean``:
            averaged over the non-ignored tokens).
        softcap: s > 0 maps logits z -> s * tanh(z / s) (after ``logit_scale``).
        logit_scale: a maps logits x -> a * x first.
        return_lse: also return the log-sum-exp per token (target's shape, the loss's dtype),
            differentiable.
        process_group: vocabulary (tensor) parallelism: ``linear_weight`` / ``linear_bias`` hold this
            rank's contiguous slice of the classes, ``target`` global ids, ``weight`` the global class
            weights; every rank returns the full-vocabulary loss. See docs/distributed.md.
        vocab_start_index: this rank's first class id (None: shards in group-rank order); without
            ``process_group``, or with DTensor operands (either argument), ValueError (with
            DTensors on every rank alike).
        empty_batch: "nan" (torch's mean over no valid token) or "zero" (0, zero gradients).
        reduce_input_grad: under ``process_group``, all-reduce the input gradient across the group
            (Megatron's column-parallel layout); False leaves each rank's partial.
        chunk_size: rows per token chunk (workspace chunk_size x C in the input's dtype; also sizes
            the vocabulary splits of the recompute backward). None: from the shape (on CUDA at
            least 1024 rows, about 1.5 GiB of workspace; CPU 48 MiB), or all kept tokens in one
            chunk where that costs no more than the fp32 dW accumulator it saves.
        grad_accum_dtype: dtype of the dW accumulation across token chunks (when the kept tokens
            do not fit one chunk; one chunk writes dW once in the parameter dtype): None or
            ``torch.float32`` (default; C x D x 4 bytes, rounded once into the parameter dtype) or
            ``linear_weight.dtype`` (C x D x 2 bytes only; every chunk rounds into a 16-bit sum).
            Ignored tokens are compacted away before the GEMMs (one host sync for their count;
            ``XENT_COMPACT=0`` disables it).
        return_stats: also return ``LossStats(n_valid, n_correct, entropy_sum, predicted)`` as
            ``cross_entropy`` does (raw sums, device tensors; ``predicted``, the argmax per token in
            the target's shape, only with ``return_predicted=True``). The token-chunked path takes
            them from the loss's own pass over each chunk (no extra read); the per-token path
            (``reduction="none"``, ``return_lse``, or no gradient) recomputes the logits once more
            for them: one extra 2 N D C GEMM, by token chunks.
        token_weight: per-token weights (the target's shape) multiplying each token's loss (and
            z-loss) and so its gradients; ``mean`` divides the cross-entropy by sum_r t_r w_y over
            the non-ignored tokens and the z-loss by sum of t_r over them (docs/math.md). A
            ``token_weight`` that requires grad takes the per-token path (its gradient is formed
            by autograd from the per-row losses).

    Returns:
        The float32 loss (float64 for float64 input; scalar, or target's shape for
        ``reduction="none"``), then the lse if ``return_lse`` (same dtype), then the stats if
        ``return_stats``. Gradients reach
        ``input``, ``linear_weight`` and ``linear_bias``
        (those that require grad) in their own dtypes. A class id outside [0, C) that is not
        ``ignore_index`` raises IndexError on CPU; on CUDA (no host sync) it makes the loss NaN
        (and every gradient, since all classes' weight gradients include that token).

    Example:
        >>> h = torch.randn(4, 128, 64, dtype=torch.bfloat16, requires_grad=True)
        >>> W = torch.randn(32000, 64, dtype=torch.bfloat16, requires_grad=True)
        >>> y = torch.randint(0, 32000, (4, 128))
        >>> linear_cross_entropy(h, W, y, label_smoothing=0.1).backward()
    """
    dtensor = is_dtensor(input) or is_dtensor(linear_weight)
    opts, options_error = make_options(
        process_group is not None or dtensor, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap,
        logit_scale=logit_scale, empty_batch=empty_batch)
    if (dtensor or process_group is not None) and requested_path() == "fused":  # alike on every rank
        raise ValueError("XENT_LINEAR_PATH=fused: the fused-epilogue linear head does not support "
                         "process_group / DTensor operands")
    if dtensor:  # layout from the placements (core/dtensor.py); refused and invalid options
        # join the options agreement first (core/exchange.py): no rank raises alone
        options_error = options_error or placement_layout_error(process_group, vocab_start_index,
                                                                "linear_cross_entropy")
        return dtensor_linear_cross_entropy(input, linear_weight, target, linear_bias, weight, opts,
                                            return_lse=return_lse, reduce_input_grad=reduce_input_grad,
                                            unsupported=dict(return_stats=return_stats,
                                                             token_weight=token_weight),
                                            options_error=options_error, chunk_size=chunk_size,
                                            grad_accum_dtype=grad_accum_dtype)
    if process_group is not None:  # validates the operands after its exchange: no rank raises alone
        return vocab_parallel_linear_cross_entropy(
            input, linear_weight, target, linear_bias, weight, opts, return_lse=return_lse,
            process_group=process_group, vocab_start_index=vocab_start_index,
            reduce_input_grad=reduce_input_grad, options_error=options_error,
            unsupported=dict(return_stats=return_stats), token_weight=token_weight,
            chunk_size=chunk_size, grad_accum_dtype=grad_accum_dtype)
    single_device_layout(vocab_start_index, "linear_cross_entropy")
    if isinstance(input, Tensor) and isinstance(linear_weight, Tensor):
        input, linear_weight, linear_bias = autocast_operands(input, linear_weight, linear_bias)
    check_linear_operands(input, linear_weight, linear_bias, target)
    chunk, accum_fp32 = check_chunking(chunk_size, grad_accum_dtype, linear_weight.dtype)
    C, D = linear_weight.shape
    w = check_weight(weight, C, input.device, input.dtype)
    tgt = class_ids(target, input.shape[:-1], "input's leading shape")
    x2 = input.reshape(tgt.numel(), D)  # (-1 is ambiguous for D = 0)
    bias = linear_bias.contiguous() if linear_bias is not None else None
    need = (input.requires_grad, linear_weight.requires_grad,
            linear_bias is not None and linear_bias.requires_grad)
    need = cast("tuple[bool, bool, bool]", tuple(n and torch.is_grad_enabled() for n in need))
    tw = check_token_weight(token_weight, Canonical(input, tgt, tuple(target.shape), C, None))
    tw_grad = tw is not None and tw.requires_grad and torch.is_grad_enabled()
    to_output = lambda r: r.view(target.shape)  # noqa: E731
    if use_fused(x2, linear_weight, opts, accum_fp32=accum_fp32, need_grad=any(need), token_weight=tw,
                 return_lse=return_lse, return_stats=return_stats):  # linear/dispatch.py
        loss = fused_head(x2, linear_weight, bias, tgt, w, opts, chunk or None)
        return to_output(loss) if opts.reduction == "none" else loss
    if opts.reduction != "none" and not return_lse and any(need) and not tw_grad:
        loss, ent, pred = linear_cross_entropy_scalar(x2, linear_weight, bias, tgt, w, opts, chunk,
                                                      accum_fp32, need, tw, return_stats)
        if not return_stats:
            return loss
        return loss, loss_stats(tgt, ent, pred, opts.ignore_index, return_predicted, to_output)
    skip = not return_lse and opts.lse_square_scale == 0
    loss_rows, lse, stats = linear_cross_entropy_rows(x2, linear_weight, bias, tgt, w, opts, skip, chunk)
    loss = reduce_rows(loss_rows, lse, stats, tgt, opts, to_output, tw)
    out: tuple[Any, ...] = (loss,)
    if return_lse:
        out += (lse.to(compute_dtype(input)).view(target.shape),)
    if return_stats:
        ent, pred = stats_rows(x2, linear_weight, bias, opts, chunk or None)
        out += (loss_stats(tgt, ent, pred, opts.ignore_index, return_predicted, to_output),)
    return out[0] if len(out) == 1 else out

