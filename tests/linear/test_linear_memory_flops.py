"""Memory and FLOPs of the fused linear cross-entropy, measured with the in-repo traffic harness
(perf/traffic.py: aten mm / addmm FLOPs and interpreted tl.dot tiles).

FLOPs of forward + backward: the token-chunked default (reduction mean / sum) does exactly
6·N·D·C = 3.0 × the 2·N·D·C of the logits GEMM, all of it in aten GEMMs (logits, dX, dW); a
per-token upstream gradient (reduction none, return_lse) does 8·N·D·C = 4.0 ×: the fused
partials kernel (tl.dot, padded tiles count in full) + the recompute backward's three GEMMs.
Memory: the extra peak grows with the gradient buffers, the chunk workspace and O(N), never N·C.
"""
import gc
import os

import pytest
import torch

import xent_triton
from harness import traffic
from xent_triton.core import launch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                reason="the traffic tool measures interpreted kernels on the CPU")
BF16 = torch.bfloat16


def _step(N, D, C, *, need=(True, True, True), ignore_all=False, dtype=BF16, ignored=None, **kw):
    """A closure running forward + backward (grads dropped afterwards, so repeated calls match).
    ``ignored``: the fraction of tokens ignored, at random positions (default every 5th);
    ``step.kept`` is the number of tokens that are not."""
    x = torch.randn(N, D).to(dtype).requires_grad_(need[0])
    w = (torch.randn(C, D) / D ** 0.5).to(dtype).requires_grad_(need[1])
    b = (torch.randn(C) * 0.1).to(dtype).requires_grad_(need[2])
    y = torch.randint(0, C, (N,))
    if ignored is None:
        y[::5] = -100
    else:
        y[torch.randperm(N)[:round(ignored * N)]] = -100
    if ignore_all:
        y[:] = -100

    def step():
        out = xent_triton.linear_cross_entropy(x, w, y, linear_bias=b, **kw)
        if isinstance(out, tuple):  # (loss, lse) or (loss, LossStats)
            loss = out[0].sum() + (0.1 * out[1].sum() if isinstance(out[1], torch.Tensor) else 0)
        else:
            loss = out.sum()
        if loss.requires_grad:
            loss.backward(torch.tensor(0.5))
        for t in (x, w, b):
            t.grad = None
    step.kept = int((y != -100).sum())
    return step


def _padded(n: int, block: int) -> int:
    return -(-n // block) * block


FLOP_CASES = [  # (N, D, C, need, kwargs, expected aten FLOPs, expected tl.dot FLOPs on padded sizes,
    #             rows the GEMMs see: "kept" = the non-ignored tokens (compacted), "all" = N)
    pytest.param(128, 64, 4096, (True, True, True), {}, 6, None, "kept", id="mean-all-grads"),
    pytest.param(100, 123, 1000, (True, True, True), dict(chunk_size=16), 6, None, "kept",
                 id="mean-unaligned-chunks"),
    pytest.param(128, 64, 4096, (True, True, True),
                 dict(reduction="sum", label_smoothing=0.1, softcap=9.0, lse_square_scale=1e-3), 6, None,
                 "kept", id="sum-all-options"),
    pytest.param(128, 64, 4096, (True, False, False), {}, 4, None, "kept", id="mean-input-grad-only"),
    pytest.param(128, 64, 4096, (False, True, True), {}, 4, None, "kept", id="mean-weight-grads-only"),
    pytest.param(128, 64, 4096, (True, True, True), dict(return_lse=True, label_smoothing=0.1), 6, 2,
                 "all", id="per-token-lse"),  # the lse of an ignored token is an output: no skipping
    pytest.param(100, 123, 1000, (True, True, True), dict(reduction="none"), 6, 2, "kept",
                 id="per-token-none-unaligned"),
    pytest.param(64, 48, 1000, (True, True, True), dict(return_stats=True), 6, None, "all",
                 id="mean-stats-of-every-token"),  # entropy / argmax cover ignored tokens
]


@pytest.mark.parametrize("N,D,C,need,kw,aten,dot,rows", FLOP_CASES)
def test_flops(N, D, C, need, kw, aten, dot, rows, record_property):
    """aten GEMM FLOPs = aten x n·D·C exactly; tl.dot FLOPs (fused partials forward of the
    per-token path) = dot x the tile-padded n·D·C; nothing else; every lane in bounds. n = the
    non-ignored tokens where the path compacts them, else N."""
    cfg = launch.linear_config(16, True, C)
    step = _step(N, D, C, need=need, **kw)
    n_rows = step.kept if rows == "kept" else N
    with traffic.count() as r:
        step()
    with traffic.count() as f:
        _step(N, D, C, need=(False, False, False), **kw)()
    total = r["flops"]
    tl_dot = f["flops"] if dot else 0
    n, d, c = _padded(n_rows, cfg.block_n), _padded(D, cfg.block_d), _padded(C, cfg.block_v)
    record_property("flops", total)
    print(f"\nflops {total} = {total / (2 * N * D * C):.4f} x 2NDC; tl.dot share {tl_dot / total:.3f}")
    assert total - tl_dot == aten * n_rows * D * C
    assert tl_dot == (dot * n * d * c if dot else 0)
    assert r["oob"] == []


def _torch_path(monkeypatch):
    """The plain-CPU path (pure torch, no interpreter) for the linear head."""
    from xent_triton.linear import chunked as linear_chunked
    from xent_triton.linear import ops as linear_ops
    monkeypatch.setattr(linear_ops, "uses_triton", lambda x: False)
    monkeypatch.setattr(linear_chunked, "uses_triton", lambda x: False)


SKIP_CASES = [  # (path, N, kwargs, base FLOPs in units of N·D·C): acceptance 1 of issue 20
    pytest.param("triton", 64, {}, 6, id="chunked-interpreter"),
    pytest.param("torch", 64, {}, 6, id="chunked-plain-cpu"),
    pytest.param("triton", 640, dict(reduction="none"), 8, id="per-token-interpreter"),
    pytest.param("torch", 640, dict(reduction="none"), 8, id="per-token-plain-cpu"),
]


@pytest.mark.parametrize("frac", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("path,N,kw,base", SKIP_CASES)
def test_ignored_tokens_cost_no_flops(path, N, kw, base, frac, monkeypatch):
    """With a fraction f of the tokens ignored (random positions), forward + backward FLOPs (aten
    GEMMs + interpreted tl.dot) <= 1.02 x (1 - f) x base N·D·C: ignored tokens are compacted away
    before the GEMMs (the per-token forward's tl.dot tiles pad the kept rows to 64: N = 640 keeps
    (1 - f) N a multiple of 64; D and C are multiples of the tile)."""
    if path == "torch":
        _torch_path(monkeypatch)
    D, C = 64, 512
    with traffic.count() as r:
        _step(N, D, C, ignored=frac, **kw)()
    ratio = r["flops"] / (base * N * D * C)
    print(f"\n{path} {kw} f={frac}: flops = {ratio:.4f} x base")
    assert ratio <= 1.02 * (1 - frac)
    assert r["oob"] == []


def _peak(step) -> int:
    gc.collect()  # earlier garbage freed inside the window would count as negative bytes
    return traffic.peak_extra_bytes(step)


def test_peak_memory_grows_with_gradients_not_logits(record_property):
    """Peak extra bytes at (N, C), (2N, C), (N, 2C), bf16, chunk_size=32 (several chunks): growth is
    the gradient buffers (dX: 2 (+ 2 for the compacted rows) bytes per N·D element, dW: 4 + 2 + 2
    per C·D (fp32 accumulator, the bf16 dW it is rounded into, the CPU's 16-bit product scratch),
    db: 4 + 2 per class), the CPU's fp32 copy of x for the fp32 logits GEMM (4 per N·D; W is upcast
    by cache-sized class blocks) and of b (4 per class), the workspace's own
    growth at 2C (32·C·(4 + 2) bytes, + 32·C·2 for the interpreter's host copy of the 16-bit dZ
    argument: an artifact of the CPU run) and O(N). Any N x C buffer fails the bounds."""
    N, D, C, chunk = 256, 32, 4096, 32
    _peak(_step(32, D, 256, chunk_size=chunk))  # warm-up
    shapes = ((N, C), (2 * N, C), (N, 2 * C))
    base, peak_2n, peak_2c = (_peak(_step(n, D, c, chunk_size=chunk)) for n, c in shapes)
    record_property("peaks", (base, peak_2n, peak_2c))
    grads = lambda n, c: 8 * n * D + 12 * c * D + 14 * c  # noqa: E731
    per_row = 96
    print(f"\npeak extra bytes: (N, C) {base}, (2N, C) {peak_2n}, (N, 2C) {peak_2c}; "
          f"gradients {grads(N, C)}, logits would be {N * C * 2}")
    assert base <= grads(N, C) + chunk * C * 8 + per_row * N
    assert 0 <= peak_2n - base <= grads(2 * N, C) - grads(N, C) + per_row * N
    assert 0 <= peak_2c - base <= grads(N, 2 * C) - grads(N, C) + chunk * C * 8 + per_row * N


ONE_CHUNK_WORKSPACE = [  # (path, workspace bytes per logit of the one (kept rows, C) chunk)
    # plain CPU: 16-bit logits, dZ in place (2) + the torch twin's fp32 row block (4: the whole
    # chunk while it is under row_blocks.BLOCK_ELEMS logits)
    pytest.param("torch", 6, id="plain-cpu"),
    # interpreter: fp32 logits (4) + 16-bit dZ (2) + the interpreter's host copy of the fp32 chunk
    # while the kernel runs (4: an artifact of the CPU run; CUDA has 4 + 2)
    pytest.param("triton", 10, id="interpreter"),
]


@pytest.mark.parametrize("path,ws", ONE_CHUNK_WORKSPACE)
def test_one_chunk_dw_has_no_fp32_accumulator(path, ws, monkeypatch, record_property):
    """Default mode, all tokens in one chunk: peak extra bytes from (N, C) to (N, 2C) grow by at
    most 2 bytes per added C·D element (dW once, in w's dtype: no fp32 accumulator, no scaled copy
    in backward, no zero "gradients" of the saved outputs) beyond the workspace (kept rows x C x ws)."""
    from xent_triton.linear import chunk_grads, cpu_gemm
    from xent_triton.linear import chunked as linear_chunked
    if path == "torch":
        _torch_path(monkeypatch)
    monkeypatch.setattr(linear_chunked, "CPU_SCRATCH_ELEMS", 1 << 14)  # w's fp32 class blocks: constant
    monkeypatch.setattr(chunk_grads, "CPU_SCRATCH_ELEMS", 1 << 14)  # its product blocks too
    monkeypatch.setattr(cpu_gemm, "BLOCK_ELEMS", 1 << 14)  # fp32 GEMM blocks too
    N, D, C = 40, 256, 1024
    _peak(_step(N, D, 256))  # warm-up
    steps = [_step(N, D, c) for c in (C, 2 * C)]
    base, peak_2c = (_peak(s) for s in steps)
    per_cd = (peak_2c - base - steps[0].kept * C * ws) / (C * D)
    record_property("bytes_per_CD", per_cd)
    print(f"\n{path}: peaks {base} -> {peak_2c}; {per_cd:.3f} B per added C·D beyond the workspace")
    assert 0 < per_cd <= 2.0
