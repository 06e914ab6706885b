"""The project's own measurement harness for the tests and perf scripts (no code outside the repo).

``harness.traffic``: bytes moved, FLOPs, launches and out-of-bounds lanes of interpreted Triton
kernels plus eager aten ops, and peak extra CPU memory. Tests import it as ``from harness import
traffic`` (``tests/`` is on ``sys.path`` under pytest); the perf scripts, run from the repository
root, as ``tests.harness.traffic``.
"""
