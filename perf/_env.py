"""Process set-up of the perf entry points (``python -m perf.<name>``), called first in their main().

Nothing here runs at import: importing a perf module never changes the environment.
"""
from __future__ import annotations

import os
import sys


def interpret_without_cuda() -> bool:
    """Without CUDA, run the Triton kernels under triton's interpreter; return whether CUDA is there.

    ``TRITON_INTERPRET=1`` (unless the caller set it) must be in place before xent_triton is first
    imported: ``@triton.jit`` reads it when the kernels are defined. Call this before importing
    xent_triton or a perf module that imports it (``perf.providers``, ``perf.measure``,
    ``perf.report``, ``perf.plots``).
    """
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and "TRITON_INTERPRET" not in os.environ:
        if "xent_triton" in sys.modules:
            raise RuntimeError("xent_triton was imported before TRITON_INTERPRET was set: its kernels "
                               "were defined for a GPU; call perf._env.interpret_without_cuda() first")
        os.environ["TRITON_INTERPRET"] = "1"
    return cuda
