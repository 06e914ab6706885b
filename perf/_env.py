"""Process set-up of the perf entry points (``python -m perf.<name>``), called first in their main().

Nothing here runs at import: importing a perf module never changes the environment.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def interpret_without_cuda() -> bool:
    """Without CUDA, run the Triton kernels under triton's interpreter; return whether CUDA is there.

    ``TRITON_INTERPRET=1`` (unless the caller set it) must be in place before xent_triton is first
    imported: ``@triton.jit`` reads it when the kernels are defined. Call this before importing
    xent_triton or a perf module that imports it (``perf.providers``, ``perf.sweep_cases``,
    ``perf.rows``, ``perf.report``, ``perf.plots``).
    """
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and "TRITON_INTERPRET" not in os.environ:
        if "xent_triton" in sys.modules:
            raise RuntimeError("xent_triton was imported before TRITON_INTERPRET was set: its kernels "
                               "were defined for a GPU; call perf._env.interpret_without_cuda() first")
        os.environ["TRITON_INTERPRET"] = "1"
    return cuda


def run_stamp(argv: list[str], device: str) -> dict:
    """Where and with what the figures were measured: device, versions, UTC date, commit (+dirty
    when tracked files differ from it) and the command."""
    import torch
    import triton

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001
            return ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit, "command": "python " + " ".join(argv)}


def cpu_name() -> str:
    """'CPU (<model>, <n> cores, <threads> torch threads)' of this machine."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU ({model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def write_csv(path: str, rows: list[dict], meta: dict) -> None:
    """``rows`` (dicts with the same keys) to ``path``, each prefixed by the ``meta`` stamp."""
    import csv

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=[*meta, *rows[0]])
        out.writeheader()
        for r in rows:
            out.writerow({**meta, **r})
