"""Case builders and the one comparison routine of the correctness tests.

Every comparison follows tests/harness/tolerances.py: ours vs float64 PyTorch (``cross_entropy_composed`` on
``x.double()`` of the same, already-rounded inputs), with PyTorch's own error in the test dtype
(the same composed function evaluated in that dtype) as the yardstick, for the loss, the lse and
the input gradient. Inputs that feed both sides (weights, soft targets, upstream gradients) are
rounded to the test dtype first, so every side sees exactly the same numbers.

Set ``XENT_ERR_LOG=/path`` to append one line per comparison (dtype, name, our error, torch's).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import torch
from torch import Tensor

import xent_triton
from reference import cross_entropy_composed
from tolerances import assert_close_rule, rel_err

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
SHORT = {BF16: "bf16", F16: "fp16", F32: "fp32", F64: "fp64"}
# PyTorch's error above this (or non-finite: e.g. fp16 log-probs overflowing at |x| ~ 1e4) is no
# yardstick: the comparison then falls back to the dtype floor alone, so it can still fail.
USABLE_TORCH_ERROR = 0.05


@dataclasses.dataclass
class Outputs:
    """What one evaluation produced: loss, lse (or None) and the input gradient."""
    loss: Tensor
    lse: Optional[Tensor]
    grad: Tensor


def logits(shape: tuple, dtype: torch.dtype, device: str, *, scale: float = 1.0,
           layout: str = "contiguous") -> Tensor:
    """Random logits of ``shape`` (class dim 1, or 0 for 1-D) stored in ``layout``.

    layouts: "contiguous"; "slice" (columns [:C] of a wider tensor); "transposed" (a (C, N)
    tensor's .t(), 2-D only); "channels_last" (class dim innermost in memory, K-dim only);
    "strided" (every other element of a twice-as-long last dim).
    """
    def rnd(*s):
        return (torch.randn(*s, device=device) * scale).to(dtype)

    if layout == "contiguous":
        return rnd(*shape)
    if layout == "slice":
        return rnd(*shape[:1], shape[1] + 7, *shape[2:])[:, : shape[1]]
    if layout == "transposed":
        assert len(shape) == 2
        return rnd(shape[1], shape[0]).t()
    if layout == "channels_last":
        return rnd(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    if layout == "strided":
        return rnd(*shape[:-1], 2 * shape[-1])[..., ::2]
    raise ValueError(layout)


def class_ids(x: Tensor, *, ignore_index: int = -100, ignore_frac: float = 0.0,
              index_dtype: torch.dtype = torch.int64, avoid: tuple = ()) -> Tensor:
    """Random class ids for logits ``x`` (never in ``avoid``); about ``ignore_frac`` of them set
    to ``ignore_index`` (then at least one row ignored and, unless ignore_frac >= 1, one kept).
    """
    C = x.shape[0] if x.dim() == 1 else x.shape[1]
    shape = () if x.dim() == 1 else x.shape[:1] + x.shape[2:]
    allowed = torch.tensor([c for c in range(C) if c not in set(avoid)] if avoid else list(range(C)))
    y = allowed[torch.randint(0, len(allowed), shape)].to(x.device)
    if ignore_frac > 0:
        drop = torch.rand(shape, device=x.device) < ignore_frac
        flat = drop.reshape(-1)
        if flat.numel() > 1:  # at least one ignored and one kept row, whatever the draw
            flat[0], flat[-1] = True, ignore_frac >= 1.0
        else:
            flat[0] = ignore_frac >= 1.0
        y = torch.where(drop, torch.full_like(y, ignore_index), y)
    return y.to(index_dtype)


def probabilities(x: Tensor) -> Tensor:
    """Random class probabilities of x's shape and dtype (class dim 1, or 0 for 1-D)."""
    cdim = 0 if x.dim() == 1 else 1
    return torch.softmax(torch.randn(x.shape, device=x.device) * 2, dim=cdim).to(x.dtype)


def class_weight(C: int, dtype: torch.dtype, device: str) -> Tensor:
    """Positive random class weights (float32 holding values exact in ``dtype``)."""
    return (torch.rand(C, device=device) * 1.5 + 0.25).to(dtype).float()


def upstream(shape: tuple, dtype: torch.dtype, device: str, reduction: str,
             generator: Optional[torch.Generator] = None) -> Tensor:
    """dL/dloss: 0.37 for a scalar loss, random per token for 'none' (values exact in dtype)."""
    if reduction != "none":
        return torch.tensor(0.37, device=device).to(dtype).float()
    return torch.randn(shape, generator=generator).to(dtype).float().to(device)


def _opts_composed(opts: dict) -> dict:
    return {k: v for k, v in opts.items() if k not in ("inplace_backward", "return_lse")}


def run_ours(x: Tensor, target: Tensor, weight: Optional[Tensor], g_fn, h_fn, **opts) -> Outputs:
    """Evaluate xent_triton.cross_entropy on (a fresh leaf sharing) x, backward with g (and h)."""
    inplace = opts.get("inplace_backward", False)
    if inplace:  # the written storage must be a non-leaf; its clone keeps x's strides (dense x)
        leaf = x.detach().clone().requires_grad_()
        inp = leaf.clone()
        assert inp.stride() == x.stride()
    else:
        leaf = inp = x.detach().requires_grad_()
    out = xent_triton.cross_entropy(inp, target, weight, **opts)
    loss, lse = out if opts.get("return_lse") else (out, None)
    assert loss.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    tensors, grads = [loss], [g_fn(loss.shape)]
    h = h_fn(lse.shape) if lse is not None and h_fn is not None else None
    if h is not None:
        tensors.append(lse)
        grads.append(h)
    torch.autograd.backward(tensors, grads)
    assert leaf.grad.dtype == x.dtype and leaf.grad.shape == x.shape
    if inplace:  # the input's storage now holds the gradient
        assert torch.equal(inp.detach().nan_to_num(7.0), leaf.grad.nan_to_num(7.0))
    return Outputs(loss.detach(), None if lse is None else lse.detach(), leaf.grad)


def run_composed(x: Tensor, target: Tensor, weight: Optional[Tensor], dtype: torch.dtype, g_fn,
                 h_fn, use_lse: bool, **opts) -> Outputs:
    """cross_entropy_composed in ``dtype`` (float64: the truth; x's dtype: torch's own error)."""
    xin = x.detach().to(dtype).requires_grad_()
    tgt = target.to(dtype) if target.is_floating_point() else target.long()
    w = weight.to(dtype) if weight is not None else None
    loss, lse = cross_entropy_composed(xin, tgt, w, return_lse=True, **_opts_composed(opts))
    tensors, grads = [loss], [g_fn(loss.shape).to(dtype)]
    if use_lse:
        tensors.append(lse)
        grads.append(h_fn(lse.shape).to(dtype))
    torch.autograd.backward(tensors, grads)
    return Outputs(loss.detach(), lse.detach(), xin.grad)


def _log(dtype: torch.dtype, name: str, e_ours: float, e_torch: float) -> None:
    path = os.environ.get("XENT_ERR_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a") as f:
            f.write(f"{SHORT[dtype]}\t{name}\t{e_ours:.3e}\t{e_torch:.3e}\t{test}\n")


def assert_rule(name: str, ours: Tensor, theirs: Optional[Tensor], ref: Tensor, dtype: torch.dtype):
    """tolerances.assert_close_rule, with torch's result dropped when it is no yardstick."""
    if theirs is not None:
        e = rel_err(theirs, ref)
        if not (math.isfinite(e) and e <= USABLE_TORCH_ERROR) or theirs.shape != ref.shape:
            theirs = None
    e_ours, e_torch = assert_close_rule(name, ours, theirs, ref, dtype)
    _log(dtype, name, e_ours, e_torch)


def check(x: Tensor, target: Tensor, weight: Optional[Tensor] = None, *, use_lse: bool = False,
          **opts) -> Outputs:
    """Run ours, torch in x's dtype and torch in float64 on the same inputs; assert the rule for
    loss, lse (when returned) and gradient, and that ignored rows get exactly zero gradient.

    ``use_lse``: the returned lse enters the objective with a random per-token upstream gradient.
    Returns our outputs for further, case-specific assertions.
    """
    dtype, dev = x.dtype, x.device
    reduction = opts.get("reduction", "mean")
    if use_lse:
        opts["return_lse"] = True
    low = dtype if dtype != F64 else F32
    g = h = None  # the same upstream gradients for every evaluation (and every call of check)

    def g_fn(shape):
        nonlocal g
        if g is None:
            g = upstream(tuple(shape), low, dev, reduction, torch.Generator().manual_seed(1234))
        return g

    def h_fn(shape):
        nonlocal h
        if h is None:
            h = upstream(tuple(shape), low, dev, "none", torch.Generator().manual_seed(4321))
        return h

    ours = run_ours(x, target, weight, g_fn, h_fn if use_lse else None, **opts)
    ref = run_composed(x, target, weight, F64, g_fn, h_fn, use_lse, **opts)
    theirs = run_composed(x, target, weight, dtype, g_fn, h_fn, use_lse, **opts)
    out_dtype = dtype  # loss and lse: float32 for low-precision input (run_ours checks), float64 for float64
    assert_rule("loss", ours.loss, theirs.loss, ref.loss, out_dtype)
    if opts.get("return_lse"):
        assert ours.lse.dtype == ours.loss.dtype
        assert_rule("lse", ours.lse, theirs.lse, ref.lse, out_dtype)
    assert_rule("grad", ours.grad, theirs.grad, ref.grad, dtype)
    if not target.is_floating_point() and not use_lse:
        ignored = (target == opts.get("ignore_index", -100)).reshape(-1)
        rows = ours.grad.reshape(1, -1) if x.dim() == 1 else ours.grad.movedim(1, -1).reshape(-1, x.shape[1])
        assert torch.all(rows[ignored] == 0), "ignored rows must get exactly zero gradient"
        if reduction == "none":
            assert torch.all(ours.loss.reshape(-1)[ignored] == 0), "ignored rows must have loss 0"
    return ours


def pid(*parts) -> str:
    """A test id from parts: dtypes shortened, None/False dropped."""
    out = []
    for p in parts:
        if p is None or p is False or p == "":
            continue
        out.append(SHORT.get(p, str(p)) if isinstance(p, torch.dtype) else str(p))
    return "-".join(out)
