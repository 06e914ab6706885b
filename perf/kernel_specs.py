"""Registry of kernel *specs*: every compile variant the launcher can choose, for static compilation.

A ``Variant`` is what ``triton.compile`` needs to build one kernel binary ahead of time, with no
GPU: the jit function, its signature types, its constexpr values, the specialization attributes
the JIT would attach, and the compile options (``num_warps``). ``perf/static_report.py`` compiles
variants for sm_80 / sm_90 and reads registers, spills, stack and load widths from the binaries.

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

Adding a kernel (e.g. the fused linear cross-entropy) is one function and one registry entry::

    def _my_args(dtype: str, flags: dict, config: dict, layout: Layout) -> dict:
        # one entry per runtime (non-constexpr) parameter: the values ops.py passes
        return dict(h_ptr=Ptr(dtype), stride_hn=4096, ..., C=layout.C, label_smoothing=0.1)

    SPECS["my_kernel"] = KernelSpec(
        "my_kernel", _lazy("linear_cross_entropy", "my_kernel"), flags=("HAS_WEIGHT", ...),
        args=_my_args, configs=lambda dtype: [{"BLOCK_V": 128, ..., "num_warps": 8, "num_stages": 3}],
        layouts=("c16", "odd"), stream_load=None)

* ``flags``: the boolean constexprs; every combination is launcher-reachable (``valid`` may
  exclude some). ``exclusive`` names flags that switch to an *alternative* code path (soft vs
  hard targets), so the CI set also compiles "all ON except that one".
* ``configs(dtype)``: dicts of the other constexprs (any value: ints, strings such as a dot
  precision) plus compile options (``num_warps``, ``num_stages``, ...), smallest to largest: the
  CI set takes the last one as the worst case for registers.
* ``layouts``: which ``LAYOUTS`` make sense for the kernel (``c16`` must be one of them).
* ``stream_load``: a source substring on the bulk load(s) whose width the report checks (the
  LLVM IR line info of each global load is matched against it, inlined helpers included); None
  skips the check.

``full_variants`` and ``ci_variants`` then cover the new spec with no further change; the static
report and tests/test_static_compile.py iterate over ``SPECS``.
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


def _ce_configs(dtype: str) -> list[dict]:
    return [{"BLOCK_C": c.block_c, "num_warps": c.num_warps} for c in launch.all_configs()]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """How to build every launcher-reachable compile variant of one jit kernel (see module doc)."""
    name: str
    kernel: Callable[[], Any]  # returns the JITFunction (lazily: specs import no kernel modules)
    flags: tuple[str, ...]
    args: Callable[[str, dict, dict, Layout], dict]
    configs: Callable[[str], list[dict]] = _ce_configs
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
    """The reduced set (tests/test_static_compile.py explains why it covers the launcher's choices):

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


# --------------------------------------------------------------------------- cross-entropy kernels
def _side_args(dtype: str, flags: dict, layout: Layout) -> dict:
    """tgt/w/wsum/soft pointers and soft strides as ops._side_args makes them (placeholders = x)."""
    s_n, s_c, s_d = layout.strides
    x = Ptr(dtype)
    soft = flags["SOFT_TARGET"]
    return dict(
        tgt_ptr=x if soft else Ptr("i64"),
        w_ptr=Ptr("fp32") if flags["HAS_WEIGHT"] else x,
        wsum_ptr=Ptr("fp32") if flags["HAS_WEIGHT"] else x,
        soft_ptr=x,  # a soft target has the logits' dtype and (contiguous) layout
        stride_tn=s_n, stride_td=s_d, stride_tc=s_c,
    )


_HPARAMS = dict(ignore_index=-100, label_smoothing=0.1, softcap=30.0, logit_scale=1.0)


def _fwd_args(dtype: str, flags: dict, config: dict, layout: Layout) -> dict:
    """cross_entropy.ops.forward_rows' launch of cross_entropy_fwd_kernel; SKIP_IGNORED as that launch
    sets it by default (hard targets, no statistics: ignored rows are not read)."""
    s_n, s_c, s_d = layout.strides
    return dict(
        x_ptr=Ptr(dtype), stride_xn=s_n, stride_xd=s_d, stride_xc=s_c,
        **_side_args(dtype, flags, layout),
        loss_ptr=Ptr("fp32"), lse_ptr=Ptr("fp32"), stats_ptr=Ptr("fp32"),
        ent_ptr=Ptr("fp32"), pred_ptr=Ptr("i64"),
        C=layout.C, D=layout.D, n_classes=layout.C, **_HPARAMS,
        SKIP_IGNORED=not flags["SOFT_TARGET"] and not flags["STATS"],
    )


def _bwd_args(dtype: str, flags: dict, config: dict, layout: Layout) -> dict:
    """cross_entropy.ops.backward_into's launch of cross_entropy_bwd_kernel. dloss of a mean/sum is an
    expanded scalar (stride 0), dlse a contiguous (R,) tensor (stride 1); span is a multiple of
    BLOCK_C."""
    s_n, s_c, s_d = layout.strides
    return dict(
        x_ptr=Ptr(dtype), stride_xn=s_n, stride_xd=s_d, stride_xc=s_c,
        dx_ptr=Ptr(dtype), stride_gn=s_n, stride_gd=s_d, stride_gc=s_c,
        **_side_args(dtype, flags, layout),
        stats_ptr=Ptr("fp32"), dloss_ptr=Ptr("fp32"), stride_dloss=0,
        dlse_ptr=Ptr("fp32"), stride_dlse=1 if flags["HAS_DLSE"] else 0,
        dt_ptr=Ptr(dtype), stride_dtn=s_n, stride_dtd=s_d, stride_dtc=s_c,
        C=layout.C, D=layout.D, n_classes=layout.C, span=4 * config["BLOCK_C"], **_HPARAMS,
    )


def _lazy(module: str, name: str) -> Callable[[], Any]:
    """A loader for jit kernel ``name`` of ``xent_triton.kernels.<module>``."""
    def load():
        import importlib
        return getattr(importlib.import_module(f"xent_triton.kernels.{module}"), name)
    return load


_CE_FLAGS = ("HAS_WEIGHT", "HAS_SMOOTHING", "SOFT_TARGET", "HAS_SOFTCAP")

SPECS: dict[str, KernelSpec] = {
    "cross_entropy_fwd": KernelSpec(
        "cross_entropy_fwd", _lazy("cross_entropy", "cross_entropy_fwd_kernel"), _CE_FLAGS + ("STATS",),
        _fwd_args, exclusive=("SOFT_TARGET",), stream_load="tl.load(x_row + cols",
        layout_options=lambda layout: launch.forward_compile_options(layout == "c16")),
    "cross_entropy_bwd": KernelSpec(
        "cross_entropy_bwd", _lazy("cross_entropy", "cross_entropy_bwd_kernel"),
        _CE_FLAGS + ("HAS_DLSE", "SOFT_GRAD"), _bwd_args, exclusive=("SOFT_TARGET",),
        stream_load="tl.load(x_row + cols",
        layout_options=lambda layout: launch.backward_compile_options(layout == "c16"),
        valid=lambda f: f["SOFT_TARGET"] or not f["SOFT_GRAD"]),  # dL/dt only for probability targets
}


# ------------------------------------------------------------ vocabulary-parallel shard forward
def _vp_fwd_args(dtype: str, flags: dict, config: dict, layout: Layout) -> dict:
    """distributed.shard_partials' launch of vocab_parallel_fwd_kernel: the layout is one rank's
    shard (C = C_local), n_classes the global C (here 4 shards), the weight a fresh shard copy.
    Its backward is cross_entropy_bwd (ignore_index -1, n_classes = C_global): same variants."""
    s_n, s_c, s_d = layout.strides
    side = _side_args(dtype, flags, layout)
    return dict(
        x_ptr=Ptr(dtype), stride_xn=s_n, stride_xd=s_d, stride_xc=s_c,
        tgt_ptr=side["tgt_ptr"], w_ptr=side["w_ptr"], soft_ptr=side["soft_ptr"],
        stride_tn=s_n, stride_td=s_d, stride_tc=s_c, part_ptr=Ptr("fp32"),
        C=layout.C, D=layout.D, n_classes=4 * layout.C, label_smoothing=_HPARAMS["label_smoothing"],
        softcap=_HPARAMS["softcap"], logit_scale=_HPARAMS["logit_scale"],
    )


SPECS["vocab_parallel_fwd"] = KernelSpec(
    "vocab_parallel_fwd", _lazy("vocab_parallel", "vocab_parallel_fwd_kernel"), _CE_FLAGS, _vp_fwd_args,
    exclusive=("SOFT_TARGET",), stream_load="tl.load(x_row + cols")


# The linear head's kernels (fused linear CE, chunk gradient, logits GEMM) register themselves in
# perf/linear_specs.py (imported last: it uses the names above).
from perf import linear_specs  # noqa: E402,F401
