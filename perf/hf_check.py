"""The whole HF / TRL integration matrix (CI runs a subset): every architecture x case x path.

    python -m perf.hf_check            # all of tests/integrations/test_{hf,trl}_integration.py
    python -m perf.hf_check -k gemma2  # extra pytest arguments pass through

Runs the two test files with ``XENT_HF_ALL=1`` (the full matrix; on CPU the Triton kernels run under
the interpreter, set by tests/conftest.py), then prints one line per architecture: which of its
cases passed on the fused head and on the logits path.
"""
from __future__ import annotations

import collections
import os
import re
import sys
import time

TEST_FILES = ("tests/integrations/test_hf_integration.py", "tests/integrations/test_trl_integration.py")


class _Collector:
    """pytest plugin: the outcome of every test id, and the ``arch`` parameter of each (if any)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, str] = {}
        self.archs: dict[str, str] = {}

    def pytest_collection_modifyitems(self, items) -> None:
        for item in items:
            spec = getattr(item, "callspec", None)
            if spec is not None and isinstance(spec.params.get("arch"), str):
                self.archs[item.nodeid] = spec.params["arch"]

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":
            prev = self.outcomes.get(report.nodeid)
            if prev is None or prev == "passed":
                self.outcomes[report.nodeid] = report.outcome


def _table(outcomes: dict[str, str], archs: dict[str, str]) -> list[str]:
    """Per architecture (the tests' ``arch`` parameter): test ids grouped by outcome; tests without
    one under 'other'."""
    rows: dict[str, dict[str, list[str]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for nodeid, outcome in outcomes.items():
        m = re.search(r"::(test_\w+)(?:\[([^\]]+)\])?$", nodeid)
        test, params = m.groups() if m else (nodeid, None)
        rows[archs.get(nodeid, "other")][outcome].append(f"{test}[{params}]" if params else test)
    lines = []
    for arch in sorted(rows):
        ok, bad = rows[arch].get("passed", []), [x for k, v in rows[arch].items() if k != "passed" for x in v]
        failed = f"  FAILED: {', '.join(bad)}" if bad else ""
        lines.append(f"{arch:10s} {len(ok):3d} passed {len(bad):3d} not{failed}")
    return lines


def main(argv: list[str] | None = None) -> int:
    os.environ["XENT_HF_ALL"] = "1"
    import pytest

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    collector = _Collector()
    t0 = time.perf_counter()
    rc = pytest.main(["-q", "-p", "no:cacheprovider", *[os.path.join(root, f) for f in TEST_FILES],
                      *(sys.argv[1:] if argv is None else argv)], plugins=[collector])
    seconds = time.perf_counter() - t0
    counts = collections.Counter(collector.outcomes.values())
    print(f"\nHF/TRL integration, full matrix: {dict(counts)} in {seconds:.0f} s")
    print("per architecture (the tests' arch parameter):")
    for line in _table(collector.outcomes, collector.archs):
        print("  " + line)
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
