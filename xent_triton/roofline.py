"""Roofline model of the cross-entropy kernels: bytes and FLOPs per op as functions of shape.

Everything here is arithmetic (no torch, no GPU): the sweep (``perf/sweep.py``) puts these figures
beside measurements, ``tests/package/test_roofline.py`` checks them against the traffic the kernels really
request (``traffic.count()`` under the Triton interpreter).

Modes: ``fwd`` (forward with grad enabled), ``bwd`` (backward alone), ``fwdbwd`` (both), ``nograd``
(forward under ``torch.no_grad()``). Shapes: N rows (tokens), C classes, D hidden size (linear head),
B bytes per element of the logits / hidden states (2 for bf16/fp16, 4 for fp32). Default options:
hard targets, no class weights, no smoothing, ``reduction="mean"``.

Costs of ``xent_triton.cross_entropy`` (from the kernel docstrings, checked by measurement):

* forward: the logits read once (N*C*B; only the non-ignored rows' unless the lse is returned) +
  per row the target (8), the target's logit (B) and the outputs loss, lse, 3 stats (20 fp32
  bytes) + the ``mean`` reduction (8: loss and row weight);
* backward: the logits read once and the gradient written once (2*N*C*B) + per row 3 stats, the
  upstream gradient and the target (24);
* ~10 non-tensor FLOPs and one exp2 (MUFU) per logit per pass.

PyTorch eager ``F.cross_entropy`` = ``log_softmax`` + ``nll_loss``, counted the way
``traffic.py`` counts eager ops (every op reads and writes all of its tensor arguments):
forward 3x the logits' bytes (log_softmax 2, nll_loss 1), backward 5x (nll_loss_backward 2,
log_softmax_backward 3): 8x in all. A GPU moves a little less (nll_loss gathers N values and its
backward writes zeros once): 2x + 4x = 6x with ``gather_full=False``. The ``.float()`` path of HF
transformers on low-precision logits adds an fp32 copy each way and runs everything in fp32:
per element B + 4*4 forward, 6*4 + B backward (bf16: 9x + 13x = 22x the bf16 logits).

Linear head ``xent_triton.linear_cross_entropy`` (X (N, D), W (C, D), P = N*D*C; ``linear/chunked.py``),
the designs of today, on CUDA (the GPU's chunking, ``chunked.token_rows``):

* token-chunked default (``mean`` / ``sum``, no ``return_lse``): the forward does all 6P, in
  vendor GEMMs (logits 2P, dX 2P, dW 2P per chunk of rows); per kept logit it moves 12 + 3B bytes
  (fp32 logits written by the GEMM 4, read twice by the chunk kernel 8, dZ written B and read by
  the dX and dW GEMMs 2B); per chunk W is read twice (logits and dX GEMMs); dW is written once in
  the parameter dtype when the kept rows fit ONE chunk, else accumulated in fp32 (the first chunk
  writes, each later one reads and writes C*D*4) and converted once (C*D*(4 + B)). The backward
  only scales dX and dW in place (read + write). Ignored rows are compacted away first (gather of
  X, scatter of dX: ~3 N D B bytes): the GEMMs and the chunk kernel see the n kept rows only;
* per-token (``reduction="none"``, ``return_lse``; ``per_token=True``): forward = the fused
  partials kernel (2P, X and W read once under ideal tile reuse), backward = recompute by
  vocabulary splits (6P: logits, dX += dZ_s W_s into an fp32 accumulator, dW_s written once),
  8 + 3B bytes per logit (fp32 logits written and read once, dZ written and read twice);
* no-grad forward: the fused partials kernel (2P).

Bytes count each GEMM's operands and result once (the ideal-reuse floor of a vendor GEMM); the
interpreter's traffic counter counts aten GEMMs the same way, plus an ``out=`` result as an
argument (``tests/package/test_roofline.py`` checks the model's FLOPs exactly and the token-chunked
path's bytes within 2 % on fp32 operands, whose CPU run has no upcast copies; the per-token and
no-grad bytes are a floor, O(N) eager ops not modelled).
The materialising torch head is F.linear (2P, writes the logits) + the eager
cross-entropy above + the dX, dW products (4P, reading the logits' gradient twice): 6P.
``linear_head_memory`` is the peak extra memory of the default head (formula checked against the
profiler's peaks per C*D element by ``tests/package/test_roofline.py``).

Time floor = max(bytes / bandwidth, tensor FLOPs / tensor rate, FLOPs / fp32 rate, exps / MUFU rate).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

MODES = ("fwd", "bwd", "fwdbwd", "nograd")
CE_PROVIDERS = ("xent_triton", "torch", "torch_float")   # the ones with a cost model
FLOPS_PER_LOGIT = 10   # non-tensor FLOPs per logit per pass (max, sub, scale, add, compare, ...)
FWD_ROW_BYTES = 8 + 20 + 8  # target, 5 fp32 outputs, mean reduction (+ B for the target's logit)
BWD_ROW_BYTES = 24          # 3 stats, upstream gradient, target


@dataclasses.dataclass(frozen=True)
class Cost:
    """Work of one op: DRAM bytes, non-tensor FLOPs, tensor-core FLOPs, transcendental ops."""
    bytes: float
    flops: float = 0.0
    mma_flops: float = 0.0
    exps: float = 0.0

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(self.bytes + o.bytes, self.flops + o.flops, self.mma_flops + o.mma_flops,
                    self.exps + o.exps)


@dataclasses.dataclass(frozen=True)
class Device:
    """Peak figures of a GPU (vendor datasheets, dense, boost clock)."""
    name: str
    bandwidth: float      # DRAM bytes/s
    mma_rate: float       # bf16 dense tensor-core FLOP/s
    fp32_rate: float      # non-tensor fp32 FLOP/s
    exp_rate: float       # MUFU ex2 results/s = SMs x 16/clk x boost clock


DEVICES = {
    "H100 SXM": Device("H100 SXM", 3.35e12, 989e12, 67e12, 132 * 16 * 1.98e9),
    "H100 PCIe": Device("H100 PCIe", 2.0e12, 756e12, 51e12, 114 * 16 * 1.755e9),
    "H200": Device("H200", 4.8e12, 989e12, 67e12, 132 * 16 * 1.98e9),
    "A100": Device("A100", 2.0e12, 312e12, 19.5e12, 108 * 16 * 1.41e9),
}


def device_for(name: str) -> Optional[Device]:
    """The table entry for a ``torch.cuda.get_device_name()`` string, or None."""
    n = name.upper()
    if "H200" in n:
        return DEVICES["H200"]
    if "H100" in n:
        return DEVICES["H100 PCIe" if "PCIE" in n else "H100 SXM"]
    if "A100" in n:
        return DEVICES["A100"]
    return None


def _check(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _compose(mode: str, fwd: Cost, bwd: Cost, nograd: Optional[Cost] = None) -> Cost:
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd, "nograd": nograd or fwd}[mode]


def cross_entropy_cost(N: int, C: int, B: int, mode: str, provider: str = "xent_triton",
                       gather_full: bool = True, ignored: float = 0.0) -> Cost:
    """Cost of a cross-entropy over (N, C) logits of B bytes each; see the module docstring.

    ``provider``: ``xent_triton``, ``torch`` (eager F.cross_entropy) or ``torch_float`` (eager on
    ``logits.float()``). ``gather_full`` counts eager ops as traffic.py does (False: as a GPU moves).
    ``ignored``: fraction of tokens with ``ignore_index``; neither our forward (no lse returned)
    nor our backward reads their logits (backward still writes their zero gradient): (3 - 2f) x
    the logits with a gradient, (1 - f) x without; eager ops process every row alike.
    """
    _check(mode)
    E = N * C
    pass_ = Cost(0, FLOPS_PER_LOGIT * E, 0, E)
    if provider == "xent_triton":
        live = 1.0 - ignored
        fwd = Cost(0, FLOPS_PER_LOGIT * E * live, 0, E * live) + Cost(E * B * live + N * (FWD_ROW_BYTES + B))
        bwd = Cost(0, FLOPS_PER_LOGIT * E * live, 0, E * live) + Cost(E * B * (1 + live) + N * BWD_ROW_BYTES)
        return _compose(mode, fwd, bwd)
    if provider in ("torch", "torch_float"):
        F = B if provider == "torch" else 4          # the dtype the ops run in
        nll_f, nll_b = (F, 2 * F) if gather_full else (0, F)
        fwd = pass_ + Cost(E * (2 * F + nll_f) + 16 * N)
        bwd = pass_ + Cost(E * (nll_b + 3 * F) + 16 * N)
        if F != B:                                   # the .float() copy and the cast back
            fwd, bwd = fwd + Cost(E * (B + F)), bwd + Cost(E * (B + F))
        return _compose(mode, fwd, bwd)
    raise ValueError(f"no cost model for provider {provider!r}; known: {CE_PROVIDERS}")


def logits_bytes(N: int, C: int, B: int) -> int:
    return N * C * B


def time_floor(cost: Cost, dev: Device, bandwidth: Optional[float] = None,
               mma_rate: Optional[float] = None) -> float:
    """Seconds at the roofline: the slowest of memory, tensor, fp32 and MUFU time.

    ``bandwidth`` / ``mma_rate`` override the device's peaks (e.g. with measured ceilings)."""
    return max(terms(cost, dev, bandwidth, mma_rate).values())


def terms(cost: Cost, dev: Device, bandwidth: Optional[float] = None,
          mma_rate: Optional[float] = None) -> dict[str, float]:
    """Seconds per resource: {'memory', 'tensor', 'fp32', 'mufu'}; the max is the floor."""
    return {"memory": cost.bytes / (bandwidth or dev.bandwidth),
            "tensor": cost.mma_flops / (mma_rate or dev.mma_rate),
            "fp32": cost.flops / dev.fp32_rate,
            "mufu": cost.exps / dev.exp_rate}


def bound(cost: Cost, dev: Device) -> str:
    """Which resource sets the floor."""
    t = terms(cost, dev)
    return max(t, key=t.get)


# ----------------------------------------------------- linear head ESTIMATE (issue 20, linear/chunked.py)
# = linear/chunked.GPU_WORKSPACE_BYTES (checked by tests/package/test_roofline.py)
GPU_WORKSPACE_BYTES = 3 << 29
GPU_MIN_ROWS = 1024             # = linear/chunked.GPU_MIN_ROWS
ACC_BYTES = 4                   # = linear/chunked.ACC_BYTES: the fp32 dW accumulator per C·D element
CHUNK_BYTES_PER_LOGIT = 14      # bf16: fp32 logits written by the GEMM, read twice, 16-bit dZ written
SYNC_S = 30e-6                  # the compaction's one host sync (count of kept rows), upper figure


def workspace_per_logit(B: int) -> int:
    """CUDA workspace bytes per chunk logit: fp32 logits + a B-byte dZ (fp32: dZ in place)."""
    return 4 + (B if B < 4 else 0)


def _chunk_rows(n: int, C: int, B: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return max(1, min(n, chunk_size))
    rows = max(GPU_MIN_ROWS, GPU_WORKSPACE_BYTES // max(1, C * workspace_per_logit(B)))
    return max(1, min(n, max(128, rows // 128 * 128)))


def token_chunking(n: int, D: int, C: int, B: int, chunk_size: Optional[int] = None) -> tuple[int, int]:
    """(rows per chunk, chunks) of the token-chunked head over n kept rows on CUDA, as
    ``chunked.token_rows``: the workspace budget's rows, or all n rows in ONE chunk when that
    workspace is at most the budget + the C·D·4 bytes of fp32 accumulator it does without."""
    rows = _chunk_rows(n, C, B, chunk_size)
    if chunk_size is None and rows < n and \
            n * C * workspace_per_logit(B) <= GPU_WORKSPACE_BYTES + C * D * ACC_BYTES:
        rows = n
    return rows, (-(-n // rows) if n else 0)


def split_columns(n: int, C: int, B: int, chunk_size: Optional[int] = None) -> int:
    """Classes per vocabulary split of the per-token recompute backward (``chunked.split_cols``)."""
    cols = max(128, _chunk_rows(n, C, B, chunk_size) * C // max(1, n) // 128 * 128)
    return max(1, min(C, cols))


def _dw_bytes(C: int, D: int, B: int, chunks: int, accum_fp32: bool) -> int:
    """Traffic of dW beyond its GEMMs' operands: one chunk writes it once in the parameter dtype;
    several read-modify-write the accumulator (fp32, converted once at the end, or B bytes)."""
    if chunks <= 1:
        return C * D * B
    acc = ACC_BYTES if accum_fp32 else B
    return C * D * acc * (2 * chunks - 1) + (C * D * (acc + B) if acc != B else 0)


def linear_cross_entropy_cost(N: int, D: int, C: int, B: int, mode: str, provider: str = "xent_triton",
                              *, ignored: float = 0.0, per_token: bool = False,
                              chunk_size: Optional[int] = None, accum_fp32: bool = True) -> Cost:
    """Cost of cross-entropy of X W^T (X (N, D), W (C, D)); see the module docstring.

    ``provider``: ``xent_triton`` (today's head: token-chunked, or ``per_token=True`` the fused
    forward + recompute backward) or ``torch`` / ``torch_float`` (F.linear then that
    cross-entropy, then the two gradient GEMMs). ``ignored``: fraction of the tokens ignored
    (compacted away by ours). ``chunk_size`` / ``accum_fp32``: the head's options.
    """
    _check(mode)
    P = N * D * C
    ops_ = (N + C) * D                                # operand elements (X and W)
    if provider != "xent_triton":
        logits = N * C * B
        gemm_f = Cost(ops_ * B + logits, mma_flops=2 * P)
        gemm_b = Cost(2 * logits + 2 * ops_ * B, mma_flops=4 * P)  # dX = G W, dW = G^T X
        ce = {m: cross_entropy_cost(N, C, B, m, provider) for m in ("fwd", "bwd")}
        return _compose(mode, gemm_f + ce["fwd"], ce["bwd"] + gemm_b)
    n = round((1.0 - ignored) * N)
    p = n * D * C
    compact = 3 * N * D * B if n < N else 0
    rows_out = N * (FWD_ROW_BYTES + B)
    nograd = Cost(ops_ * B + rows_out, FLOPS_PER_LOGIT * n * C, 2 * p, n * C)
    if per_token:
        splits = -(-C // split_columns(n, C, B, chunk_size)) if n else 0
        fwd = nograd
        bwd = Cost(n * C * (8 + 3 * B) + 2 * splits * n * D * B + 3 * C * D * B + compact
                   + n * D * (ACC_BYTES * (2 * splits - 1) + ACC_BYTES + B) + N * BWD_ROW_BYTES,
                   FLOPS_PER_LOGIT * n * C, 6 * p, n * C)
        return _compose(mode, fwd, bwd, nograd)
    rows, chunks = token_chunking(n, D, C, B, chunk_size)
    fwd = Cost(n * C * (12 + 3 * B) + 2 * chunks * C * D * B + 3 * n * D * B + compact + rows_out
               + _dw_bytes(C, D, B, chunks, accum_fp32), 2 * FLOPS_PER_LOGIT * n * C, 6 * p, 2 * n * C)
    bwd = Cost(2 * (N + C) * D * B)                   # dX and dW scaled in place by g / denominator
    return _compose(mode, fwd, bwd, nograd)


def linear_head_memory(N: int, D: int, C: int, B: int, *, ignored: float = 0.0,
                       chunk_size: Optional[int] = None, accum_fp32: bool = True) -> dict:
    """Peak extra bytes of the default (token-chunked) head's forward + backward on CUDA, beyond
    the inputs, O(N) omitted: {'rows', 'chunks', 'workspace', 'dw', 'dx', 'peak'}.

    One chunk: workspace n·C·(4 + B) + dW C·D·B + dX N·D·B (the GEMM writes dW once in the
    parameter dtype). Several: the workspace and the fp32 accumulator C·D·4 live together, then
    the accumulator and its conversion to the parameter dtype C·D·B:
    max(workspace + C·D·4, C·D·(4 + B)) + dX. The backward scales in place: adds nothing."""
    n = round((1.0 - ignored) * N)
    rows, chunks = token_chunking(n, D, C, B, chunk_size)
    ws = rows * C * workspace_per_logit(B)
    dx = N * D * B
    if chunks <= 1:
        dw = C * D * B
        peak = ws + dw + dx
    else:
        acc = ACC_BYTES if accum_fp32 else B
        dw = C * D * (acc + (B if acc != B else 0))
        peak = max(ws + C * D * acc, dw) + dx
    return {"rows": rows, "chunks": chunks, "workspace": ws, "dw": dw, "dx": dx, "peak": peak}


def linear_head_estimate(N: int, D: int, C: int, ignored: float, dev: Device,
                         gemm_tflops: tuple[float, float] = (670.0, 700.0)) -> dict:
    """ESTIMATE (a model, not a measurement) of the token-chunked default head, bf16, forward +
    backward, with a fraction ``ignored`` of the N tokens ignored, against the paired-cuBLAS floor
    (the three GEMMs of a dense head at the full N; cuBLAS at ``gemm_tflops``, the rate measured
    for these shapes in Liger PR #1356 on an H200).

    Ours: the GEMMs at the n = (1 - ignored) N kept rows (same rate); the chunk kernel's
    ``CHUNK_BYTES_PER_LOGIT`` per kept logit; dW: one chunk when n C 6 <= workspace + C D 4
    (``chunked.token_rows``): written once in bf16 by the GEMM, scaled in place in backward
    (C D 4 bytes); else chunks of the workspace's rows: the fp32 accumulator's conversion to bf16
    (C D 6) and the in-place scale (C D 4), plus (high end only) its read-modify-write in the
    GEMM epilogue of every chunk after the first (C D 8 each; the low end assumes it overlapped);
    compaction: gather of the kept rows and scatter of dX (~3 N D 2 bytes) and one host sync.
    Returns {'rows_per_chunk', 'chunks', 'floor_ms': (lo, hi), 'ours_ms': (lo, hi), 'ratio': (lo, hi)}."""
    n = round((1.0 - ignored) * N)
    rows, chunks = token_chunking(n, D, C, 2)
    cd = C * D
    fixed = n * C * CHUNK_BYTES_PER_LOGIT + cd * 4 + (cd * 6 if chunks > 1 else 0)
    fixed += 3 * N * D * 2 if n < N else 0
    rmw = (chunks - 1) * cd * 8
    out = {"rows_per_chunk": rows, "chunks": chunks}
    floors, ours = [], []
    for rate, extra in ((gemm_tflops[1], 0), (gemm_tflops[0], rmw)):
        floors.append(6 * N * D * C / (rate * 1e12) * 1e3)
        t = 6 * n * D * C / (rate * 1e12) + (fixed + extra) / dev.bandwidth + (SYNC_S if n < N else 0)
        ours.append(t * 1e3)
    out["floor_ms"] = (round(floors[0], 2), round(floors[1], 2))
    out["ours_ms"] = (round(ours[0], 2), round(ours[1], 2))
    out["ratio"] = (round(ours[0] / floors[0], 3), round(ours[1] / floors[1], 3))
    return out


HEADLINE = [  # (label, kind, N, D, C, B, mode, provider, per_token): docs/performance.md's table
    ("N=8192, C=128256, bf16", "ce", 8192, 0, 128256, 2, "fwdbwd", "xent_triton", False),
    ("same, no-grad fwd", "ce", 8192, 0, 128256, 2, "nograd", "xent_triton", False),
    ("same, fp32", "ce", 8192, 0, 128256, 4, "fwdbwd", "xent_triton", False),
    ("N=8192, C=262144, bf16", "ce", 8192, 0, 262144, 2, "fwdbwd", "xent_triton", False),
    ("N=16384, C=151936, bf16", "ce", 16384, 0, 151936, 2, "fwdbwd", "xent_triton", False),
    ("N=8192, C=32000, bf16", "ce", 8192, 0, 32000, 2, "fwdbwd", "xent_triton", False),
    ("torch eager, N=8192, C=128256, bf16", "ce", 8192, 0, 128256, 2, "fwdbwd", "torch", False),
    ("torch eager .float(), same", "ce", 8192, 0, 128256, 2, "fwdbwd", "torch_float", False),
    ("linear head default (token chunks), N=8192, D=4096, C=128256, bf16", "linear", 8192, 4096, 128256, 2,
     "fwdbwd", "xent_triton", False),
    ("linear head per-token (reduction none), same", "linear", 8192, 4096, 128256, 2, "fwdbwd",
     "xent_triton", True),
    ("torch F.linear + .float() CE, same", "linear", 8192, 4096, 128256, 2, "fwdbwd", "torch_float", False),
]


def main() -> None:
    """Print the roofline floors of the headline cases (docs/performance.md) at the datasheet peaks."""
    names = ("H100 SXM", "H200", "A100")
    print(f"{'case':70} {'mode':7} {'GB':>7} {'TFLOP':>6} " + " ".join(f"{n:>9}" for n in names) + "  bound")
    for label, kind, N, D, C, B, mode, provider, per_token in HEADLINE:
        c = (cross_entropy_cost(N, C, B, mode, provider) if kind == "ce" else
             linear_cross_entropy_cost(N, D, C, B, mode, provider, per_token=per_token))
        ms = " ".join(f"{time_floor(c, DEVICES[n]) * 1e3:7.2f}ms" for n in names)
        print(f"{label:70} {mode:7} {c.bytes / 1e9:7.2f} {c.mma_flops / 1e12:6.1f} {ms}  "
              f"{bound(c, DEVICES['H200'])}")


if __name__ == "__main__":
    main()
