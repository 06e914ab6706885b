"""The provider table of the sweep: every implementation it can time, and how to build its inputs.

A provider is a loss function of one of two kinds:

* ``ce``: ``fn(logits (N, C), target (N,)) -> loss`` (a cross-entropy over given logits);
* ``linear``: ``fn(hidden (N, D), weight (C, D), target (N,)) -> loss`` (the LM head + loss).

Optional peers (liger-kernel, cut-cross-entropy) are imported lazily and skipped when absent; the
fused linear head of this package joins the table as soon as ``xent_triton.linear_cross_entropy``
exists. Adding a provider = one ``Provider(...)`` row below.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import xent_triton

OURS = "xent_triton"  # the provider every ratio is taken for


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str                      # CSV / table key
    kind: str                      # "ce" or "linear"
    make: Callable[[], Callable]   # returns the loss function; raises ImportError when absent
    model: Optional[str] = None    # roofline provider key (None: no cost model)
    cpu: bool = True               # runs on CPU (eager torch, or Triton under the interpreter)
    traffic: bool = True           # traffic.py can count it (eager aten ops / interpreted Triton)
    triton: bool = False           # runs Triton kernels (on CPU: the slow interpreter)
    label: str = ""

    @property
    def title(self) -> str:
        return self.label or self.name

    def available(self) -> bool:
        try:
            self.make()
            return True
        except Exception:  # noqa: BLE001 - any import/attribute failure means "not installed"
            return False


def _compile_limits() -> None:
    """Every swept shape compiles its own graph: lift dynamo's recompile limit."""
    import torch._dynamo as dynamo

    for key in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                "accumulated_recompile_limit"):
        if hasattr(dynamo.config, key):
            setattr(dynamo.config, key, 1024)


@functools.lru_cache(maxsize=None)
def _compiled(linear: bool):
    _compile_limits()
    # GPU: one static graph per shape (best kernels). CPU (memory only): one dynamic graph.
    dynamic = None if torch.cuda.is_available() else True
    if linear:
        return torch.compile(lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y), dynamic=dynamic)
    return torch.compile(F.cross_entropy, dynamic=dynamic)


def _liger_ce():
    from liger_kernel.transformers import LigerCrossEntropyLoss

    return LigerCrossEntropyLoss()


def _liger_linear():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    mod = LigerFusedLinearCrossEntropyLoss()
    return lambda h, w, y: mod(w, h, y)   # liger takes the weight first


def _cce_linear():
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy


def _ours_linear():
    fn = getattr(xent_triton, "linear_cross_entropy")  # AttributeError until the linear head lands
    return fn


PROVIDERS: list[Provider] = [
    # -- cross-entropy over given logits ---------------------------------------------------------
    Provider("xent_triton", "ce", lambda: xent_triton.cross_entropy, "xent_triton", triton=True),
    Provider("torch", "ce", lambda: F.cross_entropy, "torch", label="torch eager"),
    Provider("torch_float", "ce", lambda: (lambda x, y: F.cross_entropy(x.float(), y)), "torch_float",
             label="torch eager .float()"),
    Provider("torch_compile", "ce", lambda: _compiled(False), traffic=False, label="torch.compile"),
    Provider("liger", "ce", _liger_ce, cpu=False, triton=True, label="liger-kernel"),
    # -- LM head: hidden states x classifier, then the loss ----------------------------------------
    Provider("xent_triton_linear", "linear", _ours_linear, "xent_triton", triton=True,
             label="xent_triton linear"),
    Provider("torch_linear", "linear", lambda: (lambda h, w, y: F.cross_entropy(F.linear(h, w), y)),
             "torch", label="torch eager linear"),
    Provider("torch_linear_float", "linear",
             lambda: (lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y)), "torch_float",
             label="torch eager linear .float()"),
    Provider("torch_compile_linear", "linear", lambda: _compiled(True), traffic=False,
             label="torch.compile linear .float()"),
    Provider("liger_linear", "linear", _liger_linear, cpu=False, triton=True, label="liger-kernel FLCE"),
    Provider("cce_linear", "linear", _cce_linear, cpu=False, triton=True, label="cut-cross-entropy"),
]

BY_NAME = {p.name: p for p in PROVIDERS}


def ours(kind: str) -> str:
    return OURS if kind == "ce" else OURS + "_linear"


def select(names: Optional[list[str]], cuda: bool) -> list[Provider]:
    """The requested (default: all) providers that are importable and can run on this device."""
    chosen = [BY_NAME[n] for n in names] if names else PROVIDERS
    return [p for p in chosen if (cuda or p.cpu) and p.available()]


IGNORE_EVERY = 10


def ignored_fraction(N: int) -> float:
    """Fraction of the tokens ``make_inputs`` marks ignored (every 10th)."""
    return -(-N // IGNORE_EVERY) / N


def make_inputs(kind: str, N: int, C: int, D: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Random LM-like inputs (leaves that require grad) and targets with every 10th token ignored."""
    g = torch.Generator(device=device).manual_seed(seed)
    y = torch.randint(0, C, (N,), device=device, generator=g)
    y[::IGNORE_EVERY] = -100  # padding: a known fraction, so the roofline model can count it
    if kind == "ce":
        x = (torch.randn(N, C, device=device, generator=g, dtype=torch.float32) * 2.0).to(dtype)
        return (x.requires_grad_(),), y
    h = torch.randn(N, D, device=device, generator=g, dtype=torch.float32).to(dtype)
    w = (torch.randn(C, D, device=device, generator=g, dtype=torch.float32) / D ** 0.5).to(dtype)
    return (h.requires_grad_(), w.requires_grad_()), y


# Conservative peak extra memory per provider, in bytes per logit (B = element size), for skipping
# GPU cases that would not fit. Measured on CPU (perf/RESULTS.md) and rounded up; unknown: 16.
def extra_bytes_per_logit(name: str, B: int) -> float:
    base = {"xent_triton": B + 0.5, "torch": 3 * B + 1, "torch_float": 12 + 2 * B,
            "torch_compile": 3 * B + 4, "liger": B + 1}
    linear = {"xent_triton_linear": 0.5, "liger_linear": 1.0, "cce_linear": 1.0}
    if name in base:
        return base[name]
    if name in linear:
        return linear[name]
    return 16.0 + B   # materialising linear heads: logits, fp32 copies, gradients
