"""The plain-CPU GEMMs of 16-bit operands (``linear/cpu_gemm.py``): fp32 GEMMs on upcast blocks where
the CPU has no fast 16-bit GEMM, the operands' own dtype where it has (AMX); ``XENT_CPU_GEMM`` forces
either. Checked: ``mm_fp32`` in each blocking mode against float64, its independence from an
enclosing autocast region, and the heads in both modes against float64 with the tolerance rule
(with the aten GEMMs' operand dtypes recorded: the mode really changes them)."""
from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from tolerances import assert_close_rule
from xent_triton.linear import cpu_gemm

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


class GemmDtypes:
    """Records the dtype of the operands of every ``torch.mm`` / ``torch.addmm`` / ``Tensor.addmm_``
    call while entered (the vendor GEMMs the heads run, inside their custom ops too)."""

    def __enter__(self):
        self.dtypes: set = set()
        self._patches = [mock.patch.object(torch, n, self._wrap(getattr(torch, n))) for n in ("mm", "addmm")]
        self._patches.append(mock.patch.object(torch.Tensor, "addmm_", self._wrap(torch.Tensor.addmm_)))
        for p in self._patches:
            p.start()
        return self

    def _wrap(self, fn):
        def recorded(*args, **kwargs):
            self.dtypes.add(args[-1].dtype)
            return fn(*args, **kwargs)
        return recorded

    def __exit__(self, *exc):
        for p in self._patches:
            p.stop()


MM_CASES = [  # (M, K, N, out dtype, accumulate, bias): K-blocks, row blocks, column blocks
    pytest.param(7, 300, 5, BF16, False, False, id="k-blocks-bf16"),
    pytest.param(7, 300, 5, F32, True, False, id="k-blocks-fp32-accumulate"),
    pytest.param(9, 33, 301, BF16, False, True, id="k-blocks-bias"),
    pytest.param(301, 9, 17, BF16, False, True, id="row-blocks-bias"),
    pytest.param(301, 9, 17, F32, True, False, id="row-blocks-fp32-accumulate"),
    pytest.param(5, 11, 257, F16, False, True, id="column-blocks-fp16-bias"),
    pytest.param(5, 11, 257, BF16, True, False, id="column-blocks-accumulate"),
]


@pytest.mark.parametrize("M,K,N,out_dtype,accumulate,bias", MM_CASES)
def test_mm_fp32_blocks_match_float64(M, K, N, out_dtype, accumulate, bias, monkeypatch):
    """Several blocks in every mode (BLOCK_ELEMS = 64): the result is the float64 product rounded once
    into ``out`` (fp32 accumulation: within a few fp32 ulps before that rounding)."""
    monkeypatch.setattr(cpu_gemm, "BLOCK_ELEMS", 64)
    g = torch.Generator().manual_seed(M * 1000 + N)
    half = F16 if out_dtype == F16 else BF16
    a, b = torch.randn(M, K, generator=g).to(half), torch.randn(K, N, generator=g).to(half)
    bv = torch.randn(N, generator=g).to(half) if bias else None
    out = (torch.randn(M, N, generator=g) * 3).to(out_dtype)  # accumulate: added to this
    ref = a.double() @ b.double() + (bv.double() if bias else 0) + (out.double() if accumulate else 0)
    with torch.autocast("cpu", dtype=BF16):  # must not turn the fp32 GEMMs back into bf16 ones
        got = cpu_gemm.mm_fp32(out, a, b, accumulate=accumulate, bias=bv)
    assert got is out
    tol = {BF16: 2 ** -8, F16: 2 ** -11, F32: 1e-6}[out_dtype] * float(ref.abs().max())
    assert float((out.double() - ref).abs().max()) <= tol


HEADS = ["linear_cross_entropy", "linear_token_logprobs", "linear_distillation_loss"]


def _head(name: str, h, w, b, y, ht, wt):
    if name == "linear_cross_entropy":
        return xent_triton.linear_cross_entropy(h, w, y, linear_bias=b, label_smoothing=0.1)
    if name == "linear_token_logprobs":
        lp, ent = xent_triton.linear_token_logprobs(h, w, y, linear_bias=b, return_entropy=True)
        return (lp * 0.3 - ent * 0.2).sum()
    return xent_triton.linear_distillation_loss(h, w, ht, wt, y, linear_bias=b, divergence="jsd")


def _composed(name: str, h, w, b, y, ht, wt):
    z = F.linear(h, w, b)
    if name == "linear_cross_entropy":
        return F.cross_entropy(z.float() if z.dtype != torch.float64 else z, y, label_smoothing=0.1)
    lq = F.log_softmax(z.double() if z.dtype == torch.float64 else z.float(), -1)
    ok = y != -100
    if name == "linear_token_logprobs":  # an ignored position: log-prob 0, entropy 0
        ent = -(lq.exp() * lq).sum(-1)
        return torch.where(ok, lq.gather(1, y.clamp_min(0)[:, None])[:, 0] * 0.3 - ent * 0.2, 0).sum()
    lp = F.log_softmax(F.linear(ht.to(lq.dtype), wt.to(lq.dtype)), -1)
    m = torch.log(0.5 * lp.exp() + 0.5 * lq.exp())
    div = 0.5 * (lp.exp() * (lp - m)).sum(-1) + 0.5 * (lq.exp() * (lq - m)).sum(-1)
    return torch.where(ok, div, 0).sum() / ok.sum()


@pytest.mark.parametrize("mode", ["fp32", "16bit"])
@pytest.mark.parametrize("name", HEADS)
def test_heads_in_both_modes_match_float64(name, mode, monkeypatch):
    """bf16 heads on the plain CPU path (no interpreter): loss and gradients within the rule in both
    modes; the aten GEMMs run on fp32 operands in ``fp32`` mode and on bf16 ones in ``16bit`` mode."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(cpu_gemm.CPU_GEMM_ENV, mode)
    monkeypatch.setattr(cpu_gemm, "BLOCK_ELEMS", 1 << 12)
    g = torch.Generator().manual_seed(5)
    N, D, Dt, C = 37, 48, 24, 1001
    h0, w0 = torch.randn(N, D, generator=g), torch.randn(C, D, generator=g) / D ** 0.5
    b0, ht, wt = torch.randn(C, generator=g), torch.randn(N, Dt, generator=g), torch.randn(C, Dt, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    y[::4] = -100
    res = {}
    for who, dtype in (("ours", BF16), ("torch", BF16), ("ref", torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in (h0, w0, b0)]
        fn = _head if who == "ours" else _composed
        with GemmDtypes() as seen:
            loss = fn(name, *leaves, y, ht.to(dtype), wt.to(dtype))
            loss.backward()
        res[who] = (loss, *(t.grad for t in leaves))
        if who == "ours":
            assert seen.dtypes == ({F32} if mode == "fp32" else {BF16}), seen.dtypes
    for i, what in enumerate(("loss", "d_input", "d_weight", "d_bias")):
        assert_close_rule(f"{name} {mode} {what}", res["ours"][i], res["torch"][i], res["ref"][i], BF16)


def test_mode_is_validated(monkeypatch):
    monkeypatch.setenv(cpu_gemm.CPU_GEMM_ENV, "fast")
    with pytest.raises(ValueError, match="XENT_CPU_GEMM"):
        cpu_gemm.fast_16bit_gemm(BF16)
