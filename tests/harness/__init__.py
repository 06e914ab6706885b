"""The project's own measurement harness for the tests (no code outside the repo).

``harness.traffic`` is ``perf.traffic`` (``perf/traffic.py``: bytes moved, FLOPs, launches and
out-of-bounds lanes of interpreted Triton kernels plus eager aten ops, and peak extra CPU memory),
shared with the perf scripts. The tests import it as ``from harness import traffic`` (``tests/``
is on ``sys.path`` under pytest); the repository root is put on ``sys.path`` here so that ``perf``
imports when pytest runs from elsewhere.
"""
import pathlib
import sys

_REPO = str(pathlib.Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from perf import traffic  # noqa: E402

__all__ = ["traffic"]
