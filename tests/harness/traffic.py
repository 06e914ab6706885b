"""The traffic counter, ``perf/traffic.py`` (bytes moved, FLOPs, launches, out-of-bounds lanes): the
tests import it as ``from harness import traffic``. The repository root is put on ``sys.path`` so
that ``perf`` imports when pytest runs from elsewhere."""
import pathlib
import sys

_REPO = str(pathlib.Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from perf.traffic import SUPPORTED_TRITON, clear_oob, count, oob_record, peak_extra_bytes  # noqa: E402

__all__ = ["SUPPORTED_TRITON", "count", "peak_extra_bytes", "oob_record", "clear_oob"]
