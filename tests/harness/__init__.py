"""The project's own measurement harness for the tests (no code outside the repo).

``harness.traffic``: bytes moved, FLOPs, launches and out-of-bounds lanes of interpreted Triton
kernels plus eager aten ops, and peak extra CPU memory: ``perf/traffic.py`` (the perf scripts use
it as ``perf.traffic``), re-exported for the tests, which import it as ``from harness import
traffic`` (``tests/`` is on ``sys.path`` under pytest).
"""
