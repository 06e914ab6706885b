"""Bytes moved, FLOPs, launches and out-of-bounds lanes of PyTorch + Triton code, counted on the CPU.

    from perf import traffic         # the perf scripts; the tests as ``from harness import traffic``
                                     # (tests/harness/__init__.py re-exports this module)
    with traffic.count() as r:
        loss = xent_triton.cross_entropy(x, y)
        loss.backward()
    r["bytes"]                           # kernel_read + kernel_write + aten_bytes
    r["kernel_read"], r["kernel_write"]  # bytes of the active lanes of Triton loads / stores
    r["aten_bytes"], r["aten_ops"]       # eager aten ops: bytes of their tensor inputs + outputs, count
    r["ops"]                             # {aten op name: bytes}
    r["flops"]                           # 2*M*N*K per tl.dot tile and per aten mm/addmm/bmm/baddbmm
    r["launches"]                        # Triton kernel launches
    r["oob"]                             # [("load" | "store", lanes)] out of bounds in the block
    traffic.peak_extra_bytes(fn)         # peak bytes aten allocates while fn() runs (perf/memory.py)
    traffic.oob_record(); traffic.clear_oob()   # out-of-bounds lanes of every launch since the clear

How it counts. Triton kernels must run under triton's interpreter: ``TRITON_INTERPRET=1`` set before
triton is first imported (tests/conftest.py does it on a machine without CUDA); on a GPU the hooks
are installed but never called. Inside a launch, a masked load or store counts its active lanes
times the element size, and a ``tl.dot`` counts 2*M*N*K (times the batch) FLOPs. Outside launches,
an aten op counts the bytes of its tensor inputs plus outputs, as an eager framework's kernels move
them; views, metadata queries and uninitialised allocations count nothing, fills and constant
factories count their output once. A non-aten op (a ``xent_triton::`` custom op) counts nothing
itself: its implementation runs with the counter active, so its aten ops and kernels are counted.
Every active lane of every load and store (inside ``count()`` or not) is checked against the
storages of the launch's tensor arguments: a lane outside all of them is recorded in the
out-of-bounds record (the interpreter itself reads and writes such lanes silently). Not counted
nor checked: atomics (``tl.atomic_*``) and tensor-descriptor accesses.

Triton versions. The module wraps interpreter internals: ``InterpreterBuilder.create_masked_load``,
``create_masked_store``, ``create_dot``, ``GridExecutor.__call__``, ``GridExecutor._init_args_hst``,
``TensorHandle.get_element_ty`` and ``_get_np_dtype``. Run-tested with triton 3.9; the sources of
3.6 and 3.8 have the same names (their load / store take ``cache_modifier, eviction_policy`` where
3.9 takes ``cache_policy``; the hooks pass those through untouched); 3.4 and 3.5 are not checked.
Importing the module with a triton that lacks one of them raises ``RuntimeError`` naming them.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Iterator

import numpy as np
import torch
import triton
import triton.runtime.interpreter as _interp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["SUPPORTED_TRITON", "count", "peak_extra_bytes", "oob_record", "clear_oob"]

SUPPORTED_TRITON = "3.9 (run-tested); 3.6, 3.8 (same interpreter hooks in their sources)"

_HOOKED = (("InterpreterBuilder", "create_masked_load"), ("InterpreterBuilder", "create_masked_store"),
           ("InterpreterBuilder", "create_dot"), ("GridExecutor", "__call__"),
           ("GridExecutor", "_init_args_hst"), ("TensorHandle", "get_element_ty"), (None, "_get_np_dtype"))


def _missing_interpreter_attributes() -> list[str]:
    missing = []
    for owner, name in _HOOKED:
        obj = _interp if owner is None else getattr(_interp, owner, None)
        if obj is None or not hasattr(obj, name):
            missing.append(name if owner is None else f"{owner}.{name}")
    return missing


_MISSING = _missing_interpreter_attributes()
if _MISSING:
    raise RuntimeError(
        f"perf.traffic hooks triton's interpreter (triton.runtime.interpreter), but triton "
        f"{triton.__version__} has no {', '.join(_MISSING)}. Supported: triton {SUPPORTED_TRITON}. "
        "Adapt perf/traffic.py to this triton, or install a supported one.")


class _State:
    """Counters of the running ``count()`` block, the out-of-bounds record, the running launch."""

    def __init__(self) -> None:
        self.counting = False  # inside a count() block
        self.kernel_depth = 0  # inside a Triton launch (aten ops there are the interpreter's own)
        self.ranges: list[tuple[int, int]] = []  # [lo, hi) byte ranges of the launch's tensor storages
        self.oob: list[tuple[str, int]] = []  # every out-of-bounds access since the last clear_oob()
        self.reset()

    def reset(self) -> None:
        self.kernel_read = self.kernel_write = self.flops = self.launches = 0
        self.aten_bytes = self.aten_ops = 0
        self.ops: dict[str, int] = {}
        self.block_oob: list[tuple[str, int]] = []


def _element_size(ptrs) -> int:
    return _interp._get_np_dtype(ptrs.get_element_ty()).itemsize


def _access(state: _State, kind: str, ptrs, mask) -> None:
    """Check the active lanes of one load / store against the launch's storages, and count them."""
    active = np.broadcast_to(mask.data, ptrs.data.shape)
    width = _element_size(ptrs)
    if state.ranges:
        addr = ptrs.data[active].astype(np.uint64)
        if addr.size:
            inside = np.zeros(addr.shape, dtype=bool)
            for lo, hi in state.ranges:
                inside |= (addr >= lo) & (addr + width <= hi)
            outside = int(addr.size - np.count_nonzero(inside))
            if outside:
                state.oob.append((kind, outside))
                if state.counting:
                    state.block_oob.append((kind, outside))
    if state.counting:
        nbytes = int(np.count_nonzero(active)) * width
        if kind == "load":
            state.kernel_read += nbytes
        else:
            state.kernel_write += nbytes


def _storage_ranges(args, kwargs) -> list[tuple[int, int]]:
    ranges = []
    for t in tree_flatten((list(args), dict(kwargs)))[0]:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    return ranges


def _install(state: _State) -> None:
    """Wrap the interpreter's loads, stores, dots and launches (once per process)."""
    builder, executor = _interp.InterpreterBuilder, _interp.GridExecutor
    load, store, dot = builder.create_masked_load, builder.create_masked_store, builder.create_dot
    launch, host_args = executor.__call__, executor._init_args_hst

    @functools.wraps(load)
    def create_masked_load(self, ptrs, mask, *rest, **kw):
        _access(state, "load", ptrs, mask)
        return load(self, ptrs, mask, *rest, **kw)

    @functools.wraps(store)
    def create_masked_store(self, ptrs, value, mask, *rest, **kw):
        _access(state, "store", ptrs, mask)
        return store(self, ptrs, value, mask, *rest, **kw)

    @functools.wraps(dot)
    def create_dot(self, a, b, d, *rest, **kw):
        if state.counting:
            *batch, m, k = a.data.shape
            state.flops += 2 * m * k * b.data.shape[-1] * math.prod(batch)
        return dot(self, a, b, d, *rest, **kw)

    @functools.wraps(host_args)
    def _init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = host_args(self, args_dev, kwargs)
        state.ranges = _storage_ranges(args_hst, kwargs_hst)
        return args_hst, kwargs_hst

    @functools.wraps(launch)
    def __call__(self, *args, **kwargs):
        state.kernel_depth += 1
        if state.counting:
            state.launches += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            state.kernel_depth -= 1
            state.ranges = []

    builder.create_masked_load = create_masked_load
    builder.create_masked_store = create_masked_store
    builder.create_dot = create_dot
    executor._init_args_hst = _init_args_hst
    executor.__call__ = __call__


# One state and one set of hooks per process, even if this file were imported under two names.
_STATE_ATTR = "_xent_triton_traffic_state"
_S: _State = getattr(_interp.GridExecutor, _STATE_ATTR, None) or _State()
if getattr(_interp.GridExecutor, _STATE_ATTR, None) is None:
    _install(_S)
    setattr(_interp.GridExecutor, _STATE_ATTR, _S)

# aten ops that move no data: views, metadata, uninitialised allocations.
_NO_TRAFFIC = frozenset({
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "view",
    "_unsafe_view", "alias", "as_strided", "t", "transpose", "permute", "expand", "reshape", "unsqueeze",
    "squeeze", "select", "slice", "_reshape_alias", "lift_fresh", "set_", "unbind", "split",
    "split_with_sizes", "chunk", "narrow", "diagonal", "view_as", "unfold", "numpy_T", "_to_copy_noop",
    "is_same_size", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "dim", "size", "stride", "is_contiguous", "item", "_local_scalar_dense",
    "resolve_conj", "resolve_neg", "record_stream", "_version"})
# Constant factories write their output only; fills write their first argument only.
_FACTORIES = frozenset({"zeros", "zeros_like", "full", "full_like", "ones", "ones_like", "new_zeros",
                        "new_full", "new_ones"})
_FILLS = frozenset({"fill_", "zero_"})
# Matrix products: the position of the (..., M, K) operand among the arguments.
_MATMUL_LHS = {"mm": 0, "bmm": 0, "addmm": -2, "addmm_": -2, "baddbmm": -2}


def _tensor_bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


def _record_aten(state: _State, name: str, args, kwargs, out) -> None:
    if name in _NO_TRAFFIC:
        return
    if name in _FACTORIES:
        nbytes = _tensor_bytes(out)
    elif name in _FILLS:
        nbytes = _tensor_bytes(args[0])
    else:
        nbytes = _tensor_bytes((args, kwargs)) + _tensor_bytes(out)
    lhs = _MATMUL_LHS.get(name)
    if lhs is not None and isinstance(out, torch.Tensor) and isinstance(args[lhs], torch.Tensor):
        state.flops += 2 * out.numel() * args[lhs].shape[-1]
    state.aten_bytes += nbytes
    state.aten_ops += 1
    state.ops[name] = state.ops.get(name, 0) + nbytes


_AFTER_PYTHON = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)


def _run_inside(func, args, kwargs):
    """Run a non-aten op (e.g. a ``xent_triton::`` custom op) with this counter still active, so
    that the aten ops of its implementation are counted one by one (its kernels are counted by the
    interpreter hooks); the op itself counts nothing, or its work would be counted twice."""
    keys = None
    for t in tree_flatten((args, kwargs))[0]:
        if isinstance(t, torch.Tensor):
            k = torch._C._dispatch_keys(t)
            keys = k if keys is None else keys | k
    if keys is None:
        return func(*args, **kwargs)
    with _AtenCounter():
        return func.redispatch(keys & _AFTER_PYTHON, *args, **kwargs)


class _AtenCounter(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _S.counting and not _S.kernel_depth and func.namespace != "aten":
            return _run_inside(func, args, kwargs)
        out = func(*args, **kwargs)
        if _S.counting and not _S.kernel_depth:
            _record_aten(_S, func.overloadpacket.__name__, args, kwargs, out)
        return out


@contextlib.contextmanager
def count() -> Iterator[dict]:
    """Yield a dict that, once the block has ended, holds the traffic and FLOPs of what ran in it.

    Blocks do not nest. The out-of-bounds record (``oob_record()``) is not reset: the block's own
    out-of-bounds accesses are in the result's ``oob`` and stay in the record as well.
    """
    if _S.counting:
        raise RuntimeError("traffic.count() blocks do not nest")
    _S.reset()
    result: dict = {}
    _S.counting = True
    try:
        with _AtenCounter():
            yield result
    finally:
        _S.counting = False
        result.update(kernel_read=_S.kernel_read, kernel_write=_S.kernel_write, flops=_S.flops,
                      launches=_S.launches, aten_bytes=_S.aten_bytes, aten_ops=_S.aten_ops,
                      ops=dict(_S.ops), oob=list(_S.block_oob))
        result["bytes"] = result["kernel_read"] + result["kernel_write"] + result["aten_bytes"]


def oob_record() -> list[tuple[str, int]]:
    """The live list of out-of-bounds accesses, ("load" | "store", lanes), since the last clear."""
    return _S.oob


def clear_oob() -> None:
    """Empty the out-of-bounds record."""
    _S.oob.clear()


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes aten allocates while ``fn()`` runs, above what was live before (CPU tensors): the
    profiler's allocation events summed in time order (``perf.memory.peak_extra_bytes`` on CPU,
    without its garbage collection first: a block allocated before and freed during ``fn()``
    counts negative; collect garbage first when that matters)."""
    from perf.memory import peak_extra_bytes as measured

    return measured(fn, "cpu", collect=False)
