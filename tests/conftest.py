"""Shared fixtures. Without CUDA the Triton kernels run under the interpreter (set before triton is
imported), every output buffer is poisoned with NaN so an unwritten element fails, and the traffic
counter from ../shared/tools is importable when present."""
import os
import pathlib
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["XENT_POISON_OUTPUTS"] = "1"

SHARED_TOOLS = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "tools"
if SHARED_TOOLS.is_dir():
    sys.path.insert(0, str(SHARED_TOOLS))

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
