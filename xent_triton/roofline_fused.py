"""ESTIMATE (a model, not a measurement: no GPU was lent) of the fused-epilogue linear head
(``linear/fused_head.py``) against the paired-cuBLAS floor and the vendor-GEMM default
(``roofline.linear_head_estimate``). Run ``python -m xent_triton.roofline_fused`` for the table.

Model, bf16, forward + backward, N tokens of which a fraction ``ignored`` is ignored (n kept):

* the three GEMMs (Triton, device extents): logits X Wᵀ, dX = dZ W and dW = dZᵀ X, each
  2 n D C FLOPs on the n kept rows only (the extents are the device count: no host sync) at
  ``triton_tflops`` (an assumption: a range from 550 TFLOP/s to cuBLAS's own rate; the GPU
  script measures it);
* bytes: the epilogue's 16-bit write (n C 2), the dZ kernel's read + write of the kept rows
  (n C 4), partials (n C 20 / 256 written and read), compaction gather / scatter (3 N D 2); dW:
  one chunk (N <= ``fused_head.DEFAULT_CHUNK_ROWS``) is written by one GEMM in bf16, several
  accumulate in fp32 (high end only: the read-modify-write of every chunk after the first, C D 8
  each, whatever its kept-row count; the low end assumes it overlapped); the backward scales the
  saved bf16 dX / dW IN place (``_FusedHead.backward`` -> ``linear.ops.scaled``: ``mul_``), a
  read + write of (N + C) D 2 bytes each; exponentials (n C, MUFU) assumed hidden under the MMAs.
  The GEMMs' own operand traffic is inside their rates, as in ``roofline.linear_head_estimate``.
"""
from __future__ import annotations

from .roofline import DEVICES, Device, linear_head_estimate

# = linear/fused_head.DEFAULT_CHUNK_ROWS (checked by tests/package/test_roofline.py)
DEFAULT_CHUNK_ROWS = 4096


def fused_head_estimate(N: int, D: int, C: int, ignored: float, dev: Device,
                        gemm_tflops: tuple[float, float] = (670.0, 700.0),
                        triton_tflops: tuple[float, float] = (550.0, 700.0)) -> dict:
    """{'floor_ms', 'fused_ms', 'ratio'} as (low, high) pairs (module docstring)."""
    n = round((1.0 - ignored) * N)
    ndc = N * D * C
    chunks = -(-N // DEFAULT_CHUNK_ROWS)
    scale = (N + C) * D * 4                     # backward: in-place scaling of the saved bf16 dX, dW
    byts = n * C * 2 + n * C * 4 + 2 * n * C * 20 / 256 + 3 * N * D * 2 + scale
    rmw = (chunks - 1) * C * D * 8
    floors, fused = [], []
    for cub, tri, extra in ((gemm_tflops[1], triton_tflops[1], 0), (gemm_tflops[0], triton_tflops[0], rmw)):
        floors.append(6 * ndc / (cub * 1e12) * 1e3)
        t = 6 * n * D * C / (tri * 1e12) + (byts + extra) / dev.bandwidth
        fused.append(t * 1e3)
    return {"floor_ms": tuple(round(v, 2) for v in floors), "fused_ms": tuple(round(v, 2) for v in fused),
            "ratio": tuple(round(f / fl, 3) for f, fl in zip(fused, floors))}


def main() -> None:
    dev = DEVICES["H200"]
    D, C = 4096, 128256
    print("ESTIMATE, Llama-3 head (D = 4096, C = 128256), bf16, fwd + bwd, H200 (no GPU measured)")
    print(f"{'N':>5} {'ignored':>7} {'cuBLAS floor ms':>16} {'fused ms':>14} {'fused/floor':>12} "
          f"{'vendor default ms':>18}")
    for N in (2048, 4096, 8192):
        for f in (0.0, 0.5):
            e = fused_head_estimate(N, D, C, f, dev)
            v = linear_head_estimate(N, D, C, f, dev)
            print(f"{N:5d} {f:7.1f} {e['floor_ms'][0]:7.2f}-{e['floor_ms'][1]:<8.2f} "
                  f"{e['fused_ms'][0]:6.2f}-{e['fused_ms'][1]:<7.2f} "
                  f"{e['ratio'][0]:5.3f}-{e['ratio'][1]:<6.3f} "
                  f"{v['ours_ms'][0]:8.2f}-{v['ours_ms'][1]:<8.2f}")


if __name__ == "__main__":
    main()
