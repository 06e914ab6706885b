"""Static-compile specs of the cross-entropy kernels over given logits: the forward and backward row
kernels and the vocabulary-parallel shard forward (the registry is ``perf/kernel_specs.py``; how a
spec is written: ``perf/variants.py``).
"""
from __future__ import annotations

from perf.variants import HPARAMS, JitKernel, KernelSpec, Layout, Ptr
from xent_triton.core import launch

# The kernels' modules (imported only when a variant is built).
CE_KERNELS = "xent_triton.cross_entropy.kernels"
VP_KERNELS = "xent_triton.cross_entropy.parallel_kernels"


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


def _fwd_args(dtype: str, flags: dict, config: dict, layout: Layout) -> dict:
    """cross_entropy.ops.forward_rows' launch of cross_entropy_fwd_kernel; SKIP_IGNORED as that launch
    sets it by default (hard targets, no statistics: ignored rows are not read)."""
    s_n, s_c, s_d = layout.strides
    return dict(
        x_ptr=Ptr(dtype), stride_xn=s_n, stride_xd=s_d, stride_xc=s_c,
        **_side_args(dtype, flags, layout),
        loss_ptr=Ptr("fp32"), lse_ptr=Ptr("fp32"), stats_ptr=Ptr("fp32"),
        ent_ptr=Ptr("fp32"), pred_ptr=Ptr("i64"),
        C=layout.C, D=layout.D, n_classes=layout.C, **HPARAMS,
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
        C=layout.C, D=layout.D, n_classes=layout.C, span=4 * config["BLOCK_C"], **HPARAMS,
    )


_CE_FLAGS = ("HAS_WEIGHT", "HAS_SMOOTHING", "SOFT_TARGET", "HAS_SOFTCAP")

SPECS: dict[str, KernelSpec] = {
    "cross_entropy_fwd": KernelSpec(
        "cross_entropy_fwd", JitKernel(CE_KERNELS, "cross_entropy_fwd_kernel"), _CE_FLAGS + ("STATS",),
        _fwd_args, exclusive=("SOFT_TARGET",), stream_load="tl.load(x_row + cols",
        layout_options=lambda layout: launch.forward_compile_options(layout == "c16")),
    "cross_entropy_bwd": KernelSpec(
        "cross_entropy_bwd", JitKernel(CE_KERNELS, "cross_entropy_bwd_kernel"),
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
        C=layout.C, D=layout.D, n_classes=4 * layout.C, label_smoothing=HPARAMS["label_smoothing"],
        softcap=HPARAMS["softcap"], logit_scale=HPARAMS["logit_scale"],
    )


SPECS["vocab_parallel_fwd"] = KernelSpec(
    "vocab_parallel_fwd", JitKernel(VP_KERNELS, "vocab_parallel_fwd_kernel"), _CE_FLAGS, _vp_fwd_args,
    exclusive=("SOFT_TARGET",), stream_load="tl.load(x_row + cols")

