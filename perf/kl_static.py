"""Static compile check of the KL-family kernels (distillation, token log-probs) for sm_80 / sm_90:
registers, stack and spills of every flag / divergence / config / layout variant, no GPU needed.

Run: ``python -m perf.kl_static``. (These kernels are not in ``perf.kernel_specs.SPECS`` yet, so the
CI static-compile test does not cover them; this script registers them for its own run.)
"""
from __future__ import annotations

import importlib

from perf import kernel_specs as ks
from perf import static_report as sr

HP = dict(temperature=2.0, ce_weight=0.1, beta=0.5, softcap=30.0)


def lazy(module: str, name: str):
    return lambda: getattr(importlib.import_module(f"xent_triton.kernels.{module}"), name)


def rows_args(dtype: str, C: int) -> dict:
    return dict(stride_sn=C, stride_sc=1, t_ptr=ks.Ptr("fp32"), stride_tn=C, stride_tc=1,
                lbl_ptr=ks.Ptr("i64"), C=C, ignore_index=-100, **HP)


def distill_fwd(dtype, flags, config, layout):
    return dict(s_ptr=ks.Ptr(dtype), loss_ptr=ks.Ptr("fp32"), stats_ptr=ks.Ptr("fp32"),
                **rows_args(dtype, layout.C))


def distill_bwd(dtype, flags, config, layout):
    C = layout.C
    return dict(s_ptr=ks.Ptr(dtype), dx_ptr=ks.Ptr(dtype), stride_gn=C, stride_gc=1, stats_ptr=ks.Ptr("fp32"),
                dloss_ptr=ks.Ptr("fp32"), stride_dloss=1, span=4 * config["BLOCK_C"], **rows_args(dtype, C))


def logprobs_fwd(dtype, flags, config, layout):
    C = layout.C
    return dict(x_ptr=ks.Ptr(dtype), stride_xn=C, stride_xc=1, tok_ptr=ks.Ptr("i64"), lp_ptr=ks.Ptr("fp32"),
                ent_ptr=ks.Ptr("fp32"), stats_ptr=ks.Ptr("fp32"), C=C, temperature=0.7, softcap=30.0)


def logprobs_bwd(dtype, flags, config, layout):
    C = layout.C
    return dict(x_ptr=ks.Ptr(dtype), stride_xn=C, stride_xc=1, tok_ptr=ks.Ptr("i64"),
                ent_ptr=ks.Ptr("fp32"), stats_ptr=ks.Ptr("fp32"), dx_ptr=ks.Ptr(dtype), stride_gn=C,
                stride_gc=1, dlp_ptr=ks.Ptr("fp32"),
                stride_dlp=1, dent_ptr=ks.Ptr("fp32"), stride_dent=1, C=C, span=4 * config["BLOCK_C"],
                temperature=0.7, softcap=30.0)


def main() -> None:
    def with_divergence(dtype):
        return [{"BLOCK_C": 4096, "num_warps": 8, "DIVERGENCE": d} for d in (0, 1, 2)]

    def blocks(dtype):
        return [{"BLOCK_C": 4096, "num_warps": 8}, {"BLOCK_C": 1024, "num_warps": 2}]

    dflags = ("HAS_LABELS", "HAS_CE", "HAS_SOFTCAP")
    specs = [("distill_fwd", "distillation", "distill_fwd_kernel", dflags, distill_fwd, with_divergence),
             ("distill_bwd", "distillation", "distill_bwd_kernel", dflags, distill_bwd, with_divergence),
             ("logprobs_fwd", "logprobs", "logprobs_fwd_kernel", ("ENTROPY", "HAS_SOFTCAP"), logprobs_fwd,
              blocks),
             ("logprobs_bwd", "logprobs", "logprobs_bwd_kernel", ("HAS_DENT", "HAS_SOFTCAP"), logprobs_bwd,
              blocks)]
    rows = []
    for name, module, kernel, flags, args, configs in specs:
        ks.SPECS[name] = ks.KernelSpec(name, lazy(module, kernel), flags, args, configs=configs,
                                       layouts=("c16", "odd"))
        for key in ks.full_variants(ks.SPECS[name]):
            rows += [sr.compile_one(key, arch) for arch in (80, 90)]
    bad = [r for r in rows if r.error or r.stack or r.local or r.spill_st]
    print(f"{len(rows)} compiles (sm_80 / sm_90), {len(bad)} with errors, spills or stack")
    for r in bad:
        print(" ", r)
    names = sorted({r.kernel for r in rows})
    print("max registers:", {n: max(r.regs for r in rows if r.kernel == n) for n in names})


if __name__ == "__main__":
    main()
