"""Compile variants of jit kernels, built for ``triton.compile`` ahead of time with no GPU.

A ``Variant`` is what ``triton.compile`` needs to build one kernel binary: the jit function, its
signature types, its constexpr values, the specialization attributes the JIT would attach, and the
compile options (``num_warps``). ``perf/static_report.py`` compiles the variants of every
``KernelSpec`` of the registry (``perf/kernel_specs.py``) for sm_80 / sm_90 and reads registers,
spills, stack and load widths from the binaries.

How a variant is built (mirroring ``triton.runtime.jit`` for triton 3.4 - 3.9): each spec's
``args`` function returns the *Python values* the launcher passes for every runtime parameter
(``Ptr(dtype)`` for a tensor), and ``specialize`` turns them into types the way the JIT does:

* a tensor -> ``"*bf16"`` etc., plus ``tt.divisibility=16`` when its data pointer is 16-byte
  aligned (fresh torch allocations always are; ``Ptr(..., aligned=False)`` otherwise);
* an int equal to 1 -> a constexpr (the JIT specializes ``1``; e.g. a unit class stride);
* another int -> ``"i32"`` (``"i64"`` beyond int32), plus ``tt.divisibility=16`` when divisible
  by 16 (0 included, e.g. an expanded upstream gradient);
* a bool -> ``"u1"``;
* a float -> ``"fp32"``.

Layouts (``LAYOUTS``) are the input shapes whose specializations differ: ``c16`` = (N, C) logits
with C % 16 == 0 (32000, 128256, 151936: the common case, row starts 16-byte aligned), ``odd`` =
(N, C) with C % 16 != 0 (50257: row starts unaligned, so no vector loads are possible), ``nd`` =
(N, C, D) with D > 1 (class stride D: gathers). Strides are passed by meaning (stride_xn = s_n,
stride_xd = s_d, stride_xc = s_c), which is what the kernels' parameter names ask for.

A spec's fields (``KernelSpec``):

* ``kernel``: returns the JITFunction (lazily: the registry imports no kernel module);
* ``flags``: the boolean constexprs; every combination is launcher-reachable (``valid`` may
  exclude some). ``exclusive`` names flags that switch to an *alternative* code path (soft vs
  hard targets), so the CI set also compiles "all ON except that one";
* ``args(dtype, flags, config, layout)``: one entry per runtime (non-constexpr) parameter, the
  values the launcher passes;
* ``configs(dtype)``: dicts of the other constexprs (any value: ints, strings such as a dot
  precision) plus compile options (``num_warps``, ``num_stages``, ...), smallest to largest: the
  CI set takes the last one as the worst case for registers;
* ``layouts``: which ``LAYOUTS`` make sense for the kernel (``c16`` must be one of them);
* ``stream_load``: a source substring on the bulk load(s) whose width the report checks (the
  LLVM IR line info of each global load is matched against it, inlined helpers included); None
  skips the check;
* ``ci_pick``: a filter on the CI set (the representative subset CI compiles), ``arch_ok``: which
  targets a variant is built for.

``full_variants`` (the cross-product) and ``ci_variants`` (the CI set) cover a new spec with no
further change.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterator, Optional

from xent_triton.core import launch

LOGITS_DTYPES = ("fp32", "bf16", "fp16")
OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
DIVISIBILITY = [["tt.divisibility", 16]]


@dataclasses.dataclass(frozen=True)
class Ptr:
    """A tensor argument: element type (triton name) and whether its data pointer is 16B aligned."""
    dtype: str
    aligned: bool = True


@dataclasses.dataclass(frozen=True)
class Layout:
    """A logits shape class: C, D and the strides (s_n, s_c, s_d) of the contiguous (N, C, D) view."""
    name: str
    C: int
    D: int
    doc: str

    @property
    def strides(self) -> tuple[int, int, int]:
        return self.C * self.D, self.D, 1


LAYOUTS = {
    "c16": Layout("c16", 32000, 1, "(N, C) logits, C % 16 == 0 (common case)"),
    "odd": Layout("odd", 50257, 1, "(N, C) logits, C % 16 != 0 (row starts unaligned)"),
    "nd": Layout("nd", 21, 4097, "(N, C, D) logits, D > 1 (class stride D)"),
}


def row_configs(dtype: str) -> list[dict]:
    """The row kernels' launch configs (``launch.config(C)`` returns one of these), smallest first."""
    return [{"BLOCK_C": c.block_c, "num_warps": c.num_warps} for c in launch.all_configs()]


@dataclasses.dataclass(frozen=True)
class JitKernel:
    """Jit kernel ``name`` of module ``module`` (a full dotted path), imported when called: the
    registry imports no kernel module."""
    module: str
    name: str

    def __call__(self) -> Any:
        import importlib
        return getattr(importlib.import_module(self.module), self.name)


# Hyper-parameters the row kernels receive (all non-default: their code paths are compiled).
HPARAMS = dict(ignore_index=-100, label_smoothing=0.1, softcap=30.0, logit_scale=1.0)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """How to build every launcher-reachable compile variant of one jit kernel (see module doc)."""
    name: str
    kernel: JitKernel
    flags: tuple[str, ...]
    args: Callable[[str, dict, dict, Layout], dict]
    configs: Callable[[str], list[dict]] = row_configs
    layouts: tuple[str, ...] = tuple(LAYOUTS)
    exclusive: tuple[str, ...] = ()
    stream_load: Optional[str] = None
    valid: Callable[[dict], bool] = lambda flags: True
    layout_options: Callable[[str], dict] = lambda layout: {}  # extra compile options per layout
    dtypes: tuple[str, ...] = LOGITS_DTYPES  # the operand dtypes the launcher accepts
    ci_pick: Optional[Callable[[VariantKey], bool]] = None  # CI compiles only these (None: all)
    arch_ok: Callable[[VariantKey, int], bool] = lambda key, arch: True  # per-arch launch configs


@dataclasses.dataclass(frozen=True)
class VariantKey:
    """A picklable name for one variant (process pools send these, not jit functions)."""
    kernel: str
    dtype: str
    flags: tuple[tuple[str, bool], ...]
    config: tuple[tuple[str, Any], ...]
    layout: str

    @property
    def label(self) -> str:
        on = "+".join(k for k, v in self.flags if v) or "-"
        cfg = ",".join(f"{k}={v}" for k, v in self.config)
        return f"{self.kernel}[{self.dtype},{self.layout},{on},{cfg}]"


@dataclasses.dataclass
class Variant:
    """Everything ``triton.compile(ASTSource(...), target, options)`` needs for one binary."""
    key: VariantKey
    fn: Any
    signature: dict[str, str]
    constexprs: dict[tuple[int, ...], Any]
    attrs: dict[tuple[int, ...], list]
    options: dict[str, int]


def specialize(value: Any) -> tuple[str, bool]:
    """(type, divisible_by_16) as the JIT derives them from a launch argument; type "constexpr"
    means the JIT turns the argument into a compile-time constant (ints equal to 1)."""
    if isinstance(value, Ptr):
        return "*" + value.dtype, value.aligned
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        kind = "i32" if -2**31 <= value < 2**31 else "i64"
        return kind, value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"cannot specialize {value!r}")


def build(spec: KernelSpec, key: VariantKey) -> Variant:
    """The Variant for ``key`` (a combination of dtype, flags, config and layout of ``spec``)."""
    fn = spec.kernel()
    flags, config = dict(key.flags), dict(key.config)
    options = {k: v for k, v in config.items() if k in OPTION_KEYS}
    given = dict(flags)
    given.update({k: v for k, v in config.items() if k not in OPTION_KEYS})
    given.update(spec.args(key.dtype, flags, config, LAYOUTS[key.layout]))
    names = list(fn.arg_names)
    missing, extra = set(names) - set(given), set(given) - set(names)
    if missing or extra:
        raise ValueError(f"{spec.name}: args missing {sorted(missing)}, unknown {sorted(extra)}")
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(names, fn.params)):
        value = given[name]
        if param.is_constexpr:
            signature[name], constexprs[(i,)] = "constexpr", value
            continue
        ty, div16 = specialize(value)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = value
        elif div16:
            attrs[(i,)] = DIVISIBILITY
    return Variant(key, fn, signature, constexprs, attrs, options)


def _keys(spec: KernelSpec, flag_sets: list[dict], layouts,
          largest_only: bool = False) -> Iterator[VariantKey]:
    seen = set()
    for dtype in spec.dtypes:
        configs = spec.configs(dtype)
        chosen = configs[-1:] if largest_only else configs
        for flags, config, layout in itertools.product(flag_sets, chosen,
                                                       [lay for lay in layouts if lay in spec.layouts]):
            if not spec.valid(flags):
                continue
            config = {**config, **spec.layout_options(layout)}
            key = VariantKey(spec.name, dtype, tuple((f, bool(flags[f])) for f in spec.flags),
                             tuple(sorted(config.items())), layout)
            if key not in seen:
                seen.add(key)
                yield key


def all_flag_sets(spec: KernelSpec) -> list[dict]:
    return [dict(zip(spec.flags, bits)) for bits in itertools.product((False, True), repeat=len(spec.flags))]


def full_variants(spec: KernelSpec) -> Iterator[VariantKey]:
    """Every launcher-reachable variant: dtypes x flag combinations x configs x layouts."""
    return _keys(spec, all_flag_sets(spec), spec.layouts)


def ci_variants(spec: KernelSpec) -> Iterator[VariantKey]:
    """The reduced set (tests/perf/test_static_compile.py explains why it covers the launcher's choices):

    * c16 layout, every dtype x config, flags all OFF, all ON, and all ON but each ``exclusive``
      flag (soft and hard targets are alternative paths: each has its own worst case);
    * c16 layout, every dtype, largest config, each flag alone;
    * the other layouts, every dtype, largest config, the same OFF / ON / ON-but-exclusive sets.
    """
    off = {f: False for f in spec.flags}
    on = {f: True for f in spec.flags}
    extremes = [off, on] + [dict(on, **{f: False}) for f in spec.exclusive]
    alone = [dict(off, **{f: True}) for f in spec.flags]
    others = [lay for lay in spec.layouts if lay != "c16"]
    keys = itertools.chain(_keys(spec, extremes, ["c16"]), _keys(spec, alone, ["c16"], largest_only=True),
                           _keys(spec, extremes, others, largest_only=True))
    keys = dict.fromkeys(keys)  # in order, without duplicates
    yield from (k for k in keys if spec.ci_pick is None or spec.ci_pick(k))
