"""Launch policy: block sizes, the backward split, and the compile options per logits layout."""
import pytest
import torch

from xent_triton.core import launch


def _view3(x):
    return x.unsqueeze(-1) if x.dim() == 2 else x.reshape(x.shape[0], x.shape[1], -1)


@pytest.mark.parametrize("make,friendly", [
    pytest.param(lambda: torch.randn(4, 32000, dtype=torch.bfloat16), True, id="C32000-bf16"),
    pytest.param(lambda: torch.randn(4, 50257, dtype=torch.bfloat16), False, id="C50257-rows-unaligned"),
    pytest.param(lambda: torch.randn(4, 64, 3), False, id="kdim-class-stride-3"),
    pytest.param(lambda: torch.randn(4, 1029)[:, 5:], False, id="column-slice-offset-5"),
    pytest.param(lambda: torch.randn(64, 4).t(), False, id="transposed"),
])
def test_vector_friendly_layouts(make, friendly):
    """Only unit-class-stride, 16-byte-aligned rows count as vector friendly."""
    assert launch.vector_friendly(_view3(make())) is friendly
    opts = launch.backward_compile_options(friendly)
    assert opts == ({} if friendly else {"maxnreg": launch.BWD_UNALIGNED_MAXNREG})


@pytest.mark.parametrize("R,C", [(1, 262144), (64, 128256), (4096, 32000)])
def test_backward_grid_covers_every_column_once(R, C, monkeypatch):
    """splits * span covers C, span is a whole number of blocks, and no split is empty."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    block = launch.config(C).block_c
    (rows, splits), span = launch.backward_grid(R, C, block)
    assert rows == R and span % block == 0
    assert (splits - 1) * span < C <= splits * span
