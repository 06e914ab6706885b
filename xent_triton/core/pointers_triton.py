"""Row addressing of the kernels over an (N, C, D) view: pointer math, so it has no torch twin and
lives outside the formula module (``core/formulas_triton.py``, whose every helper has one).
"""
import triton
import triton.language as tl  # noqa: F401  (Triton requires it in a jit function's module)


@triton.jit
def row_pointer(ptr, r, D, stride_n, stride_d):
    """Rows are r = n * D + d over an (N, C, D) view; int64 so N*C past 2**31 is safe."""
    n = r // D
    d = r - n * D
    return ptr + n * stride_n + d * stride_d
