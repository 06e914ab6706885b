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


def _traffic_module():
    """The traffic counter when the kernels run under the interpreter and it is importable, else None.

    Imported lazily: importing it patches the interpreter's loads and stores (to check every active
    lane against the storages of the kernel's tensor arguments), which is what we want here.
    """
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return None
    try:
        import traffic
    except ImportError:
        return None
    return traffic


def assert_no_oob_lanes() -> None:
    """Fail if any Triton kernel since the last clear touched memory outside its tensor arguments.

    Reads and then clears the traffic tool's global record (also filled outside ``traffic.count()``;
    note that ``traffic.count()`` resets it when it starts). No-op without the traffic tool.
    """
    traffic = _traffic_module()
    if traffic is None:
        return
    oob = list(traffic._STATE["oob"])
    traffic._STATE["oob"].clear()
    assert not oob, f"Triton kernel accessed out-of-bounds lanes: {oob} (list of (load|store, lanes))"


@pytest.fixture(autouse=True)
def _no_out_of_bounds_lanes():
    """Every test of the suite: no kernel launch may read or write a lane outside its tensors."""
    traffic = _traffic_module()
    if traffic is not None:
        traffic._STATE["oob"].clear()
    yield
    assert_no_oob_lanes()
