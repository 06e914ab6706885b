"""The one static-compile registry: every jit kernel of the package, by spec name.

``SPECS`` gathers the specs of each op's kernels: ``perf/ce_specs.py`` (cross-entropy forward /
backward, the vocabulary-parallel shard forward), ``perf/linear_specs.py`` (the linear head's
kernels) and ``perf/kl_specs.py`` (distillation and token log-probs). ``perf/variants.py`` builds
their compile variants: ``ci_variants`` (the representative subset tests/perf/test_static_compile.py
compiles) and ``full_variants`` (the cross-product, ``python -m perf.static_report --full``).

Adding a kernel is one ``KernelSpec`` in its op's spec module (``perf/variants.py`` says how);
``test_every_jit_kernel_is_registered`` fails while a ``@triton.jit`` kernel is missing here.
"""
from __future__ import annotations

from perf import ce_specs, kl_specs, linear_specs
from perf.variants import KernelSpec

SPECS: dict[str, KernelSpec] = {**ce_specs.SPECS, **linear_specs.SPECS, **kl_specs.SPECS}
