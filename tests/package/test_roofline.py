"""The roofline model (xent_triton.roofline) against the traffic the kernels really request, its
arithmetic on the headline case, and the GPU validation script's behaviour without CUDA."""
import functools
import gc
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from xent_triton import roofline

ROOT = pathlib.Path(__file__).resolve().parents[2]
N, C = 64, 32000


@pytest.fixture(scope="module")
def measured():
    """Bytes moved by forward and backward of each provider, counted by harness.traffic (bf16, N=64)."""
    if torch.cuda.is_available():
        pytest.skip("the traffic harness counts interpreted kernels (CPU only)")
    from harness import traffic

    torch.manual_seed(0)
    x = (torch.randn(N, C) * 2).to(torch.bfloat16)
    y = torch.randint(0, C, (N,))
    y[::8] = -100  # ignored rows: our backward must not read their logits
    fns = {"xent_triton": xent_triton.cross_entropy, "torch": F.cross_entropy,
           "torch_float": lambda a, b: F.cross_entropy(a.float(), b)}
    out = {}
    mp = pytest.MonkeyPatch()
    mp.setenv("XENT_POISON_OUTPUTS", "0")  # a NaN fill would count as traffic
    for name, fn in fns.items():
        xx = x.clone().requires_grad_()
        with traffic.count() as f:
            loss = fn(xx, y)
        with traffic.count() as b:
            loss.backward(torch.tensor(0.37))
        with traffic.count() as ng, torch.no_grad():
            fn(xx, y)
        assert not f["oob"] and not b["oob"]
        out[name] = {"fwd": f["bytes"], "bwd": b["bytes"], "fwdbwd": f["bytes"] + b["bytes"],
                     "nograd": ng["bytes"]}
    mp.undo()
    return out


@pytest.mark.parametrize("provider,mode,tol", [
    pytest.param("xent_triton", "fwd", 0.01, id="xent-fwd"),
    pytest.param("xent_triton", "bwd", 0.01, id="xent-bwd"),
    pytest.param("xent_triton", "fwdbwd", 0.01, id="xent-fwdbwd"),
    pytest.param("xent_triton", "nograd", 0.01, id="xent-nograd"),
    pytest.param("torch", "fwdbwd", 0.01, id="torch-fwdbwd"),
    pytest.param("torch_float", "fwdbwd", 0.01, id="torch_float-fwdbwd"),
])
def test_model_matches_measured_traffic(measured, provider, mode, tol):
    cost = roofline.cross_entropy_cost(N, C, 2, mode, provider, ignored=1 / 8)
    got = measured[provider][mode]
    assert abs(got - cost.bytes) <= tol * got, (provider, mode, got, cost.bytes)


def test_model_numbers():
    # Headline: N=8192, C=128256 bf16 forward+backward = 3 x 2.10 GB of logits.
    E = 8192 * 128256
    c = roofline.cross_entropy_cost(8192, 128256, 2, "fwdbwd")
    assert c.bytes == pytest.approx(3 * 2 * E, rel=1e-4)
    h200 = roofline.DEVICES["H200"]
    assert roofline.time_floor(c, h200) == pytest.approx(3 * 2 * E / 4.8e12, rel=1e-4)
    assert roofline.bound(c, h200) == "memory"
    assert roofline.device_for("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert roofline.device_for("NVIDIA H200").bandwidth == 4.8e12
    # Eager: 8x the logits traffic.py-style, 6x as a GPU moves it; .float() on bf16: 22x.
    torch_bytes = roofline.cross_entropy_cost(64, C, 2, "fwdbwd", "torch").bytes
    assert torch_bytes == pytest.approx(8 * 64 * C * 2, rel=1e-3)
    assert roofline.cross_entropy_cost(64, C, 2, "fwdbwd", "torch", gather_full=False).bytes == \
        pytest.approx(6 * 64 * C * 2, rel=1e-3)
    # Linear head, token-chunked default: all 6P in the forward, the backward only scales;
    # per-token path 2P + 6P; no-grad 2P; tensor-bound on the Llama-3 head.
    P = 8192 * 4096 * 128256
    lin = functools.partial(roofline.linear_cross_entropy_cost, 8192, 4096, 128256, 2)
    assert [lin(m).mma_flops for m in ("fwd", "bwd", "fwdbwd", "nograd")] == [6 * P, 0, 6 * P, 2 * P]
    assert [lin(m, per_token=True).mma_flops for m in ("fwd", "bwd")] == [2 * P, 6 * P]
    assert lin("fwdbwd", ignored=0.5).mma_flops == 3 * P
    assert roofline.bound(lin("fwdbwd"), h200) == "tensor"
    with pytest.raises(ValueError):
        roofline.cross_entropy_cost(1, 1, 2, "sideways")


LLAMA3_HEAD = [  # (N, ignored fraction, rows per chunk, chunks): the ESTIMATE's chunking (issue 20)
    pytest.param(2048, 0.0, 2048, 1, id="N2048"),
    pytest.param(4096, 0.0, 4096, 1, id="N4096"),
    pytest.param(8192, 0.0, 2048, 4, id="N8192"),
    pytest.param(8192, 0.5, 4096, 1, id="N8192-half-ignored"),
]


@pytest.mark.parametrize("N,f,rows,chunks", LLAMA3_HEAD)
def test_linear_head_estimate_matches_the_chunking(N, f, rows, chunks):
    """The estimate's constants are the head's, its chunking is ``chunked.token_rows``'s on CUDA,
    and its ratio to the paired-cuBLAS floor scales with the kept tokens (GEMM-bound)."""
    from xent_triton import roofline_fused
    from xent_triton.linear import chunked, fused_head

    assert roofline.GPU_WORKSPACE_BYTES == chunked.GPU_WORKSPACE_BYTES
    assert roofline.GPU_MIN_ROWS == chunked.GPU_MIN_ROWS
    assert roofline.ACC_BYTES == chunked.ACC_BYTES
    assert roofline_fused.DEFAULT_CHUNK_ROWS == fused_head.DEFAULT_CHUNK_ROWS
    est = roofline.linear_head_estimate(N, 4096, 128256, f, roofline.DEVICES["H200"])
    assert (est["rows_per_chunk"], est["chunks"]) == (rows, chunks)
    lo, hi = est["ratio"]
    assert (1 - f) <= min(lo, hi) and max(lo, hi) <= (1 - f) * 1.2 + 0.01


LIN_N, LIN_D, LIN_C = 64, 64, 512
LIN_CASES = [  # (chunk_size, per_token): the token-chunked default (one chunk, 4 chunks), per-token
    pytest.param(None, False, id="one-chunk"),
    pytest.param(16, False, id="four-chunks"),
    pytest.param(None, True, id="per-token"),
]


@pytest.mark.parametrize("chunk,per_token", LIN_CASES)
def test_linear_model_matches_measured_traffic(chunk, per_token):
    """FLOPs of every mode exactly (aten GEMMs + tl.dot); bytes of the token-chunked head's forward
    and backward within 2 % (fp32 operands: the CPU run has no upcast copies). The counter reads
    a GEMM's ``out=`` buffer as an argument too: the model's bytes plus each such result (logits
    n C 4, dX n D B, the first dW C D 4) is what it counts."""
    if torch.cuda.is_available():
        pytest.skip("the traffic harness counts interpreted kernels (CPU only)")
    from harness import traffic

    N, D, C, B = LIN_N, LIN_D, LIN_C, 4
    torch.manual_seed(0)
    x = torch.randn(N, D).requires_grad_()
    w = (torch.randn(C, D) / D ** 0.5).requires_grad_()
    y = torch.randint(0, C, (N,))
    kw = dict(chunk_size=chunk, reduction="none" if per_token else "mean")
    mp = pytest.MonkeyPatch()
    mp.setenv("XENT_POISON_OUTPUTS", "0")  # a NaN fill would count as traffic
    with traffic.count() as f:
        loss = xent_triton.linear_cross_entropy(x, w, y, **kw)
    with traffic.count() as b:
        loss.backward(torch.rand(N) if per_token else torch.tensor(0.37))
    with traffic.count() as ng, torch.no_grad():
        xent_triton.linear_cross_entropy(x, w, y, **kw)
    mp.undo()
    for mode, got in (("fwd", f), ("bwd", b), ("nograd", ng)):
        cost = roofline.linear_cross_entropy_cost(N, D, C, B, mode, chunk_size=chunk, per_token=per_token)
        assert got["flops"] == cost.mma_flops, (mode, got["flops"], cost.mma_flops)
        assert not got["oob"]
        if not per_token and mode != "nograd":
            out_args = N * C * 4 + N * D * B + C * D * 4 if mode == "fwd" else 0
            excess = got["bytes"] - cost.bytes - out_args
            assert abs(excess) <= 0.02 * got["bytes"], (mode, got["bytes"], cost.bytes)


def test_linear_head_memory_formula():
    """The docs' peak-memory figures at the Llama-3 head (bf16, CUDA chunking): one chunk at
    N = 2048 and 4096 (workspace + dW C·D·2 + dX), chunks of 2048 rows and the fp32 accumulator
    at 8192 (max(workspace + C·D·4, C·D·(4 + 2)) + dX)."""
    D, C = 4096, 128256
    mem = {N: roofline.linear_head_memory(N, D, C, 2) for N in (2048, 4096, 8192)}
    assert [(m["rows"], m["chunks"]) for m in mem.values()] == [(2048, 1), (4096, 1), (2048, 4)]
    assert [m["dw"] / (C * D) for m in mem.values()] == [2, 2, 6]
    assert [round(m["peak"] / 1e9, 2) for m in mem.values()] == [2.64, 4.24, 3.74]
    assert roofline.linear_head_memory(8192, D, C, 2, accum_fp32=False)["dw"] == C * D * 2


ACCUM_CASES = [  # (path, grad_accum_dtype, CPU workspace bytes per chunk logit; see
    # tests/linear/test_linear_memory_flops.py ONE_CHUNK_WORKSPACE for what the CPU paths keep per logit)
    pytest.param("torch", None, 6, id="fp32-accumulator-plain-cpu"),
    pytest.param("triton", None, 10, id="fp32-accumulator-interpreter"),
    pytest.param("torch", torch.bfloat16, 6, id="bf16-accumulation-plain-cpu"),
]


@pytest.mark.parametrize("path,accum,ws", ACCUM_CASES)
def test_chunked_dw_bytes_per_cd_match_the_model(path, accum, ws, monkeypatch):
    """Several token chunks (bf16, chunk_size=16, N = 40 with 8 ignored, D = 256, C = 1024 ->
    2048): the peak extra bytes grow by ``linear_head_memory``'s dW bytes per added C·D element
    (fp32 accumulator + the bf16 dW it is converted into: 6; bf16 accumulation: 2) beyond the
    workspace's growth, within 0.3 B (per-class buffers: bias gradient, db)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("the peak-memory harness measures CPU runs")
    from harness import traffic
    from xent_triton.linear import chunk_grads, chunked, cpu_gemm
    from xent_triton.linear import ops as linear_ops

    if path == "torch":
        monkeypatch.setattr(linear_ops, "uses_triton", lambda x: False)
        monkeypatch.setattr(chunked, "uses_triton", lambda x: False)
    monkeypatch.setattr(chunked, "CPU_SCRATCH_ELEMS", 1 << 14)  # w's fp32 class blocks: constant
    monkeypatch.setattr(chunk_grads, "CPU_SCRATCH_ELEMS", 1 << 14)  # its product blocks too
    monkeypatch.setattr(cpu_gemm, "BLOCK_ELEMS", 1 << 14)  # fp32 GEMM blocks too
    N, D, C, chunk = 40, 256, 1024, 16
    torch.manual_seed(0)
    x = torch.randn(N, D).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, C, (N,))
    y[::5] = -100

    def peak(c):
        t = torch.where(y >= 0, y % c, y)
        w = (torch.randn(c, D) / D ** 0.5).to(torch.bfloat16).requires_grad_()
        b = (torch.randn(c) * 0.1).to(torch.bfloat16).requires_grad_()

        def step():
            xent_triton.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=chunk,
                                             grad_accum_dtype=accum).backward(torch.tensor(0.5))
            x.grad = w.grad = b.grad = None
        gc.collect()
        return traffic.peak_extra_bytes(step)

    peak(256)  # warm-up
    base, grown = peak(C), peak(2 * C)
    per_cd = (grown - base - chunk * C * ws) / (C * D)
    model = roofline.linear_head_memory(N, D, C, 2, chunk_size=chunk, accum_fp32=accum is None)
    assert model["chunks"] > 1
    print(f"\n{path} {accum}: {per_cd:.3f} B per added C·D beyond the workspace; "
          f"model {model['dw'] / (C * D)}")
    assert abs(per_cd - model["dw"] / (C * D)) <= 0.3


class _CudaLike:
    """Enough of a CUDA bf16 tensor for ``chunked.token_rows`` (no GPU here)."""
    is_cuda = True
    dtype = torch.bfloat16
    device = torch.device("cuda")

    def element_size(self):
        return 2


@pytest.mark.parametrize("n,rows", [(2048, 2048), (4096, 4096), (4823, 4823), (4824, 2048), (8192, 2048)])
def test_one_chunk_threshold_on_cuda(n, rows, monkeypatch):
    """token_rows at the Llama-3 head on CUDA: one chunk up to n = 4823 kept tokens, then 2048-row
    chunks (docs/performance.md's statement)."""
    from xent_triton.linear import chunked

    monkeypatch.setattr(chunked, "uses_triton", lambda x: True)
    monkeypatch.setattr(chunked, "compute_dtype", lambda x: torch.float32)
    assert chunked.token_rows(n, 128256, 4096, _CudaLike()) == rows


NO_ACCUMULATOR = [  # (need_dw, accum_fp32, head dtype): no fp32 dW accumulator to do without
    pytest.param(False, True, torch.bfloat16, id="frozen-head"),
    pytest.param(True, False, torch.bfloat16, id="dW-summed-in-bf16"),
    pytest.param(True, True, torch.float32, id="fp32-head"),
]


@pytest.mark.parametrize("need_dw,accum_fp32,w_dtype", NO_ACCUMULATOR)
def test_one_chunk_only_where_it_saves_an_accumulator(need_dw, accum_fp32, w_dtype, monkeypatch):
    """Where several chunks keep no fp32 dW accumulator, one chunk saves nothing: the automatic chunk
    stays (n = 4096 at the Llama-3 head: 2048-row chunks, not one 4096-row workspace), in the CE head
    (``token_rows``) and the KL scalar path (``scalar_rows``, ~16M logits per buffer)."""
    from xent_triton.kl import linear_scalar
    from xent_triton.linear import chunked

    monkeypatch.setattr(chunked, "uses_triton", lambda x: True)
    monkeypatch.setattr(chunked, "compute_dtype", lambda x: torch.float32)
    w = torch.empty(0, dtype=w_dtype)
    acc = chunked.accumulator_bytes(need_dw, accum_fp32, w, _CudaLike())
    assert acc == 0
    assert chunked.token_rows(4096, 128256, 4096, _CudaLike(), None, acc) == 2048
    assert chunked.accumulator_bytes(True, True, torch.empty(0, dtype=torch.bfloat16), _CudaLike()) == 4
    x = torch.empty(0, dtype=torch.bfloat16)
    auto = linear_scalar.CHUNK_LOGITS // 128256
    assert linear_scalar.scalar_rows(4 * auto, 128256, 4096, x, x, 0, acc) == auto
    assert linear_scalar.scalar_rows(4 * auto, 128256, 4096, x, x, 0, 4) == 4 * auto  # an accumulator saved


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA failure path")
def test_gpu_check_fails_fast_without_cuda(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "perf" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "no CUDA device" in r.stderr
    assert not (tmp_path / "out").exists()  # failed before doing anything
