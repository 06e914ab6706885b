"""The roofline model (xent_triton.roofline) against the traffic the kernels really request, its
arithmetic on the headline case, and the GPU validation script's behaviour without CUDA."""
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
    # Linear head: 2P forward, 6P backward; tensor-bound on the Llama-3 head.
    P = 8192 * 4096 * 128256
    lin = roofline.linear_cross_entropy_cost(8192, 4096, 128256, 2, "fwdbwd")
    assert lin.mma_flops == 8 * P
    assert roofline.linear_cross_entropy_cost(8192, 4096, 128256, 2, "fwd").mma_flops == 2 * P
    assert roofline.bound(lin, h200) == "tensor"
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
    from xent_triton.linear import chunked

    assert roofline.GPU_WORKSPACE_BYTES == chunked.GPU_WORKSPACE_BYTES
    assert roofline.ACC_BYTES == chunked.ACC_BYTES
    est = roofline.linear_head_estimate(N, 4096, 128256, f, roofline.DEVICES["H200"])
    assert (est["rows_per_chunk"], est["chunks"]) == (rows, chunks)
    lo, hi = est["ratio"]
    assert (1 - f) <= min(lo, hi) and max(lo, hi) <= (1 - f) * 1.2 + 0.01


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA failure path")
def test_gpu_check_fails_fast_without_cuda(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "perf" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "no CUDA device" in r.stderr
    assert not (tmp_path / "out").exists()  # failed before doing anything
