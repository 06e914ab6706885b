"""Static-compile specs of the linear head's kernels: the fused linear cross-entropy forward, the chunk
gradient kernels of ``linear/chunked.py`` and the fused-epilogue logits GEMM (the registry is
``perf/kernel_specs.py``; how a spec is written: ``perf/variants.py``).
"""
from __future__ import annotations

from perf.variants import HPARAMS, JitKernel, KernelSpec, Layout, Ptr
from xent_triton.core import launch

# The kernels' modules (imported only when a variant is built).
LINEAR_KERNELS = "xent_triton.linear.kernels"
CHUNK_KERNELS = "xent_triton.linear.chunk_kernels"
GEMM_KERNELS = "xent_triton.linear.gemm_kernels"

SPECS: dict[str, KernelSpec] = {}


# ------------------------------------------------------------- fused linear cross-entropy
# Layouts for these kernels (hidden states X (N, D), classifier W (C, D), both contiguous):
# c16 -> C = 32000, D = 4096 (rows 16-byte aligned: cp.async pipelining, the aligned tiles);
# odd -> C = 50257, D = 4096; nd -> C = 21, D = 4097 (rows unaligned: the unaligned tiles).
def _linear_shape(layout: Layout) -> tuple[int, int, int, bool]:
    """(N, C, D, aligned) the linear kernels see for a layout."""
    D = 4096 if layout.D == 1 else layout.D
    N = 8192 if layout.name == "c16" else 8191
    return N, layout.C, D, D % 16 == 0


def _linear_tiles(dtype: str, layout: Layout) -> dict:
    cfg = launch.linear_config(32 if dtype == "fp32" else 16, _linear_shape(layout)[3])
    return dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, DOT_UPCAST=False)


def _linear_configs(dtype: str) -> list[dict]:
    """Per dtype: the launch's warps / stages and every dot precision it can pick (fp32 follows
    torch.get_float32_matmul_precision: tf32, tf32x3, ieee; the FMA "ieee" dot is the largest)."""
    bits = 32 if dtype == "fp32" else 16
    cfg, precisions = launch.LINEAR_FWD[bits], ("tf32", "tf32x3", "ieee") if bits == 32 else ("tf32",)
    return [{"DOT_PRECISION": p, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            for p in precisions]


def _linear_common(dtype: str, layout: Layout) -> dict:
    N, C, D, _ = _linear_shape(layout)
    return dict(x_ptr=Ptr(dtype), stride_xn=D, stride_xd=1, w_ptr=Ptr(dtype), stride_wc=D, stride_wd=1,
                b_ptr=Ptr(dtype), cw_ptr=Ptr("fp32"), tgt_ptr=Ptr("i64"), N=N, C=C, D=D,
                class_offset=0, ignore_index=-100, logit_scale=1.0, softcap=30.0)


def _linear_fwd_args(dtype: str, flags: dict, config: dict, layout: Layout) -> dict:
    """linear_ops.forward_partials' launch of linear_xent_fwd_kernel."""
    return dict(_linear_common(dtype, layout), part_ptr=Ptr("fp32"), n_splits=16, tiles_per_split=7,
                **_linear_tiles(dtype, layout))


_LIN_FLAGS = ("HAS_BIAS", "HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP")

SPECS["linear_xent_fwd"] = KernelSpec(
    "linear_xent_fwd", JitKernel(LINEAR_KERNELS, "linear_xent_fwd_kernel"),
    _LIN_FLAGS + ("SKIP_IGNORED",), _linear_fwd_args, configs=_linear_configs)


# ------------------------------------------------ chunked linear head: dZ over a GEMM's logits chunk
# linear/chunked.py: fp32 logits of a (rows, C) token chunk or (N, C_s) split in a fresh workspace
# (row stride C), dZ in the operands' dtype (same buffer for fp32); no nd layout (always 2-D).
def _chunk_common(dtype: str, flags: dict, layout: Layout) -> dict:
    z = Ptr("fp32")
    return dict(z_ptr=z, stride_zr=layout.C, dz_ptr=Ptr(dtype), stride_dzr=layout.C, tgt_ptr=Ptr("i64"),
                w_ptr=Ptr("fp32") if flags["HAS_WEIGHT"] else z,
                wsum_ptr=Ptr("fp32") if flags["HAS_WEIGHT"] else z,
                C=layout.C, n_classes=layout.C, **HPARAMS)


def _chunk_loss_grad_args(dtype: str, flags: dict, config: dict, layout: Layout) -> dict:
    """chunked.loss_grad_chunk's launch of chunk_loss_grad_kernel (placeholders as it passes them)."""
    z = Ptr("fp32")
    return dict(_chunk_common(dtype, flags, layout),
                zcoef_ptr=Ptr("fp32") if flags["HAS_ZLOSS"] else z,
                tw_ptr=Ptr("fp32") if flags["HAS_TOKEN_WEIGHT"] else z,
                loss_ptr=Ptr("fp32"), lse_ptr=Ptr("fp32"), stats_ptr=Ptr("fp32"), ent_ptr=Ptr("fp32"),
                pred_ptr=Ptr("i64"))


def _chunk_grad_args(dtype: str, flags: dict, config: dict, layout: Layout) -> dict:
    """chunked.grad_chunk's launch of chunk_grad_kernel (the recompute backward's split at class
    offset 0; dloss an expanded scalar (stride 0), dlse contiguous, or dloss again without it)."""
    return dict(_chunk_common(dtype, flags, layout), stats_ptr=Ptr("fp32"), dloss_ptr=Ptr("fp32"),
                stride_dloss=0, dlse_ptr=Ptr("fp32"), stride_dlse=1 if flags["HAS_DLSE"] else 0,
                class_offset=0)


_CHUNK_FLAGS = ("HAS_WEIGHT", "HAS_SMOOTHING", "HAS_SOFTCAP")

SPECS["chunk_loss_grad"] = KernelSpec(
    "chunk_loss_grad", JitKernel(CHUNK_KERNELS, "chunk_loss_grad_kernel"),
    _CHUNK_FLAGS + ("HAS_ZLOSS", "HAS_TOKEN_WEIGHT", "STATS"), _chunk_loss_grad_args,
    layouts=("c16", "odd"), stream_load="tl.load(z_row + cols",
    layout_options=lambda layout: launch.forward_compile_options(layout == "c16"))
SPECS["chunk_grad"] = KernelSpec(
    "chunk_grad", JitKernel(CHUNK_KERNELS, "chunk_grad_kernel"), _CHUNK_FLAGS + ("HAS_DLSE",),
    _chunk_grad_args,
    layouts=("c16", "odd"), stream_load="tl.load(z_row + cols")


# ---------------------------------------------------- fused-epilogue logits GEMM (16-bit operands)
# linear/fused_epilogue.py: X (R, K) compacted hidden states, W (C, K), the 16-bit logits chunk
# (R, C) row stride C, partials (S, R, 5) fp32; b / class weights replaced by the partials buffer
# when absent; count a 1-element int64 device tensor; num_progs = the SM count (132 on an H100).
def _gemm_configs(dtype: str) -> list[dict]:
    """Per target (GEMM_SM80 on sm_80, GEMM_16 from sm_90; ``arch_ok`` pairs them) x SHIFTED."""
    from xent_triton.linear.fused_epilogue import GEMM_16, GEMM_SM80
    return [{"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "SUB_N": c.sub_n,
             "GROUP_M": c.group_m, "DOT_UPCAST": False, "SHIFTED": shifted, "num_warps": c.num_warps,
             "num_stages": c.num_stages} for c in (GEMM_SM80, GEMM_16) for shifted in (False, True)]


def _gemm_arch_ok(key, arch: int) -> bool:
    from xent_triton.linear.fused_epilogue import gemm_config_for
    c, cfg = gemm_config_for(arch), dict(key.config)
    return (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]) == \
        (c.block_m, c.block_n, c.block_k, c.num_warps)


def _gemm_args(dtype: str, flags: dict, config: dict, layout: Layout) -> dict:
    R, C, K, _ = _linear_shape(layout)
    return dict(x_ptr=Ptr(dtype), stride_xm=K, stride_xk=1, w_ptr=Ptr(dtype), stride_wn=K, stride_wk=1,
                b_ptr=Ptr(dtype) if flags["HAS_BIAS"] else Ptr("fp32"), cw_ptr=Ptr("fp32"),
                tgt_ptr=Ptr("i64"), count_ptr=Ptr("i64"), z_ptr=Ptr(dtype), stride_zm=C, stride_zn=1,
                part_ptr=Ptr("fp32"), R=R, C=C, K=K, class_offset=0, ignore_index=-100,
                logit_scale=1.0, softcap=30.0, num_progs=132)


SPECS["logits_gemm"] = KernelSpec(
    "logits_gemm", JitKernel(GEMM_KERNELS, "logits_gemm_kernel"), _LIN_FLAGS, _gemm_args,
    configs=_gemm_configs, layouts=("c16", "odd", "nd"), dtypes=("bf16", "fp16"), arch_ok=_gemm_arch_ok,
    ci_pick=lambda k: k.dtype == "bf16" and k.layout == "c16" and all(v for _, v in k.flags))


def _dz_args(dtype: str, flags: dict, config: dict, layout: Layout) -> dict:
    """fused_epilogue.shifted_dz_'s launch over the fused head's (R, C) shifted buffer."""
    R, C, _, _ = _linear_shape(layout)
    return dict(z_ptr=Ptr(dtype), stride_zm=C, part_ptr=Ptr("fp32"), stats_ptr=Ptr("fp32"),
                tgt_ptr=Ptr("i64"), w_ptr=Ptr("fp32"), wsum_ptr=Ptr("fp32"), R=R, C=C, class_offset=0,
                ignore_index=-100, label_smoothing=0.1, softcap=30.0, logit_scale=1.0)


SPECS["shifted_dz"] = KernelSpec(
    "shifted_dz", JitKernel(GEMM_KERNELS, "shifted_dz_kernel"), _CHUNK_FLAGS, _dz_args,
    configs=lambda dtype: [{"BLOCK_N": 256, "num_warps": 4}], layouts=("c16", "odd"),
    dtypes=("bf16", "fp16"),
    ci_pick=lambda k: k.dtype == "bf16" and k.layout == "c16" and all(v for _, v in k.flags))


# ---------------------------------------- the fused head's dX / dW GEMMs (device row / reduction extent)
# fused_epilogue.dx_gemm: dX (R, D) = s dZ (R, C) W (C, D); dw_gemm: dW (C, D) = s (acc + dZᵀ X) over
# the first count rows, + db; "dw_gemm" writes w's dtype (one chunk, or the last), "dw_gemm_f32"
# the fp32 partial sum of an earlier chunk (no scale there). R, C, D as the logits GEMM's layouts:
# c16 has 16-byte aligned rows (the launchers' aligned tiles), odd (C) and nd (D) do not.
def _bwd_configs(kernel: str):
    """The configs ``bwd_config_for(arch, kernel)`` gives on sm_80 and sm_90 (``_bwd_arch_ok``)."""
    def configs(dtype: str) -> list[dict]:
        from xent_triton.linear.fused_epilogue import bwd_config_for
        cfgs = {(c.block_m, c.block_n, c.block_k, c.group_m, c.num_warps, c.num_stages)
                for c in (bwd_config_for(arch, kernel, aligned) for arch in (80, 90)
                          for aligned in (False, True))}
        return [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": g, "DOT_UPCAST": False,
                 "OUT_RNE": False, "num_warps": w, "num_stages": st} for m, n, k, g, w, st in sorted(cfgs)]
    return configs


def _bwd_arch_ok(key, arch: int) -> bool:
    from xent_triton.linear.fused_epilogue import bwd_config_for
    c, cfg = bwd_config_for(arch, key.kernel[:2], key.layout == "c16"), dict(key.config)
    return (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], cfg["num_stages"]) == \
        (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages)


def _dx_args(dtype: str, flags: dict, config: dict, layout: Layout) -> dict:
    R, C, D, _ = _linear_shape(layout)
    return dict(a_ptr=Ptr(dtype), stride_am=C, stride_ak=1, b_ptr=Ptr(dtype), stride_bk=D, stride_bn=1,
                out_ptr=Ptr(dtype), stride_om=D, stride_on=1, count_ptr=Ptr("i64"), scale_ptr=Ptr("fp32"),
                M=R, N=D, K=C)


def _dw_args(out_dtype=None):
    def args(dtype: str, flags: dict, config: dict, layout: Layout) -> dict:
        R, C, D, _ = _linear_shape(layout)
        return dict(a_ptr=Ptr(dtype), stride_ak=C, stride_am=1, b_ptr=Ptr(dtype), stride_bk=D, stride_bn=1,
                    out_ptr=Ptr(out_dtype or dtype), stride_om=D, stride_on=1, acc_ptr=Ptr("fp32"),
                    db_ptr=Ptr("fp32"), count_ptr=Ptr("i64"), scale_ptr=Ptr("fp32"), M=C, N=D, K=R)
    return args


def _ci_all_on(k) -> bool:
    return k.dtype == "bf16" and k.layout == "c16" and all(v for _, v in k.flags)


_BWD = dict(layouts=("c16", "odd", "nd"), dtypes=("bf16", "fp16"), arch_ok=_bwd_arch_ok,
            ci_pick=_ci_all_on)
SPECS["dx_gemm"] = KernelSpec("dx_gemm", JitKernel(GEMM_KERNELS, "dx_gemm_kernel"), ("HAS_SCALE",), _dx_args,
                              configs=_bwd_configs("dx"), **_BWD)
SPECS["dw_gemm"] = KernelSpec("dw_gemm", JitKernel(GEMM_KERNELS, "dw_gemm_kernel"),
                              ("HAS_ACC", "HAS_DB", "HAS_SCALE"), _dw_args(),
                              configs=_bwd_configs("dw"), **_BWD)
SPECS["dw_gemm_f32"] = KernelSpec("dw_gemm_f32", JitKernel(GEMM_KERNELS, "dw_gemm_kernel"),
                                  ("HAS_ACC", "HAS_DB"), _dw_args("fp32"),
                                  **dict(_BWD, configs=lambda dtype: [
                                      dict(c, HAS_SCALE=False) for c in _bwd_configs("dw")(dtype)],
                                      ci_pick=lambda k: False))  # dw_gemm's kernel: --full only
