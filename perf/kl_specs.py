"""Static-compile specs of the KL family's kernels: the distillation forward / backward (every
divergence: kl, reverse_kl, jsd) and the token log-prob forward / backward (the registry is
``perf/kernel_specs.py``; how a spec is written: ``perf/variants.py``).

The launches are ``kl/ops.py``'s: (R, C) student / teacher / logits rows (row stride C, class stride
1: the JIT's constant), the row kernels' configs (``launch.config(C)``), the divergence a constexpr
(a config dimension here), placeholders where ops.py passes them (the student for absent labels,
the log-probs for an absent entropy). The teacher has the student's dtype (the usual case; a
teacher in another dtype is one more specialization of the same code).
"""
from __future__ import annotations

from perf.variants import JitKernel, KernelSpec, Layout, Ptr, row_configs
from xent_triton.core import launch

# The kernels' modules (imported only when a variant is built).
DISTILL_KERNELS = "xent_triton.kl.distill_kernels"
LOGPROBS_KERNELS = "xent_triton.kl.logprobs_kernels"
DIVERGENCES = (0, 1, 2)  # kl, reverse_kl, jsd (kl/ops.DIVERGENCES)


def _divergence_configs(dtype: str) -> list[dict]:
    """Every row config x divergence, smallest block first (jsd, the most code, last)."""
    return [{**c, "DIVERGENCE": d} for c in row_configs(dtype) for d in DIVERGENCES]


def _distill_fwd_configs(dtype: str) -> list[dict]:
    """The forward's configs with its launch options (``launch.distill_forward_compile_options``)."""
    return [{**c, **launch.distill_forward_compile_options(c["DIVERGENCE"] == 2)}
            for c in _divergence_configs(dtype)]


def _distill_common(dtype: str, flags: dict, layout: Layout) -> dict:
    C = layout.C
    return dict(s_ptr=Ptr(dtype), stride_sn=C, stride_sc=1, t_ptr=Ptr(dtype), stride_tn=C, stride_tc=1,
                lbl_ptr=Ptr("i64") if flags["HAS_LABELS"] else Ptr(dtype), C=C, ignore_index=-100,
                temperature=2.0, ce_weight=0.1, beta=0.5, softcap=30.0)


def _distill_fwd_args(dtype: str, flags: dict, config: dict, layout: Layout) -> dict:
    """kl/ops.distill_forward_rows' launch of distill_fwd_kernel."""
    return dict(_distill_common(dtype, flags, layout), loss_ptr=Ptr("fp32"), stats_ptr=Ptr("fp32"))


def _distill_bwd_args(dtype: str, flags: dict, config: dict, layout: Layout) -> dict:
    """kl/ops.distill_backward_into's launch of distill_bwd_kernel (dloss of a mean / sum: an
    expanded scalar, stride 0; span a multiple of BLOCK_C)."""
    return dict(_distill_common(dtype, flags, layout), dx_ptr=Ptr(dtype), stride_gn=layout.C, stride_gc=1,
                stats_ptr=Ptr("fp32"), dloss_ptr=Ptr("fp32"), stride_dloss=0, span=4 * config["BLOCK_C"])


def _logprobs_fwd_args(dtype: str, flags: dict, config: dict, layout: Layout) -> dict:
    """kl/ops.logprobs_forward_rows' launch of logprobs_fwd_kernel."""
    C = layout.C
    return dict(x_ptr=Ptr(dtype), stride_xn=C, stride_xc=1, tok_ptr=Ptr("i64"), lp_ptr=Ptr("fp32"),
                ent_ptr=Ptr("fp32"), stats_ptr=Ptr("fp32"), C=C, ignore_index=-100, temperature=0.7,
                softcap=30.0)


def _logprobs_bwd_args(dtype: str, flags: dict, config: dict, layout: Layout) -> dict:
    """kl/ops.logprobs_backward_into's launch of logprobs_bwd_kernel (per-token upstream gradients:
    contiguous (R,); the entropy's absent: dlp again, stride 0)."""
    C = layout.C
    return dict(x_ptr=Ptr(dtype), stride_xn=C, stride_xc=1, tok_ptr=Ptr("i64"), ent_ptr=Ptr("fp32"),
                stats_ptr=Ptr("fp32"), dx_ptr=Ptr(dtype), stride_gn=C, stride_gc=1, dlp_ptr=Ptr("fp32"),
                stride_dlp=1, dent_ptr=Ptr("fp32"), stride_dent=1 if flags["HAS_DENT"] else 0, C=C,
                ignore_index=-100, span=4 * config["BLOCK_C"], temperature=0.7, softcap=30.0)


def _ci_pick(key) -> bool:
    """CI compiles the largest block (the most live state) in bf16 only (every divergence and the
    flag extremes on c16, the extremes on odd); ``--full`` compiles every dtype x config."""
    return dict(key.config)["BLOCK_C"] == max(c["BLOCK_C"] for c in row_configs(key.dtype)) \
        and key.dtype == "bf16"


_DISTILL_FLAGS = ("HAS_LABELS", "HAS_CE", "HAS_SOFTCAP")


def _distill_valid(flags: dict) -> bool:
    return flags["HAS_LABELS"] or not flags["HAS_CE"]  # the CE term needs labels


SPECS: dict[str, KernelSpec] = {
    "distill_fwd": KernelSpec(
        "distill_fwd", JitKernel(DISTILL_KERNELS, "distill_fwd_kernel"), _DISTILL_FLAGS, _distill_fwd_args,
        configs=_distill_fwd_configs, layouts=("c16", "odd"), valid=_distill_valid,
        stream_load="tl.load(s_row + cols", ci_pick=_ci_pick),
    "distill_bwd": KernelSpec(
        "distill_bwd", JitKernel(DISTILL_KERNELS, "distill_bwd_kernel"), _DISTILL_FLAGS, _distill_bwd_args,
        configs=_divergence_configs, layouts=("c16", "odd"), valid=_distill_valid,
        stream_load="tl.load(s_row + cols", ci_pick=_ci_pick),
    "logprobs_fwd": KernelSpec(
        "logprobs_fwd", JitKernel(LOGPROBS_KERNELS, "logprobs_fwd_kernel"), ("ENTROPY", "HAS_SOFTCAP"),
        _logprobs_fwd_args,
        layouts=("c16", "odd"), stream_load="tl.load(x_row + cols", ci_pick=_ci_pick),
    "logprobs_bwd": KernelSpec(
        "logprobs_bwd", JitKernel(LOGPROBS_KERNELS, "logprobs_bwd_kernel"), ("HAS_DENT", "HAS_SOFTCAP"),
        _logprobs_bwd_args,
        layouts=("c16", "odd"), stream_load="tl.load(x_row + cols", ci_pick=_ci_pick),
}
