"""Issue 18 item 2: the KL family is shift-invariant in fp32 (the student's and the teacher's logits
at different levels, per-row offsets 0 / 100 / 1e4 of either sign).

Rule (issue 18, acceptance 2): per-token loss and student-gradient error vs float64 (the same
rounded inputs) <= max(2 x torch's own fp32 ``log_softmax``-composition error, floor), torch's own
gradient rounded to the student's dtype (ours is returned in it). Floors: 1e-6 for the losses and
fp32 gradients (the issue's; the reverse-KL / JSD backward subtracts the per-row mean from per-class
terms, formulated so that no two rounded quantities of nearly equal value cancel: see
kl/distill_kernels.py) and 2^-6 in bf16 gradients (two ulps: the interpreter truncates fp32 -> bf16
where CUDA rounds to nearest, and the linear
form's dW sums those truncated logit gradients). Each table also
prints its worst ratio under the issue's plain rule (floor 1e-6 everywhere): error / tolerance.

One table per divergence, function and CPU path; each walks student fp32 / bf16 x teacher fp32 /
bf16 x T in {0.5, 1, 2} x offset in {0, 100, 1e4} (per row, alternating sign: the teacher above
or below the student).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from test_distillation import composed
from tolerances import rel_err
from xent_triton.core import launch

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
N, C, D = 4, 200, 8
FLOOR = 1e-6
DT = {F32: "fp32", BF16: "bf16"}
GRAD_FLOOR = {F32: 1e-6, BF16: 2.0 ** -6}
DIVERGENCES = ["kl", "reverse_kl", "jsd"]
FULL = [(sd, td, T, off) for sd in (F32, BF16) for td in (F32, BF16) for T in (0.5, 1.0, 2.0)
        for off in (0.0, 100.0, 1e4)]
# CI time: each dtype pair once, every T and offset != 0 among them; KL_SHIFT_FULL=1 walks all 36
# (the figures in docs/kl.md)
SPARSE = [(F32, F32, 2.0, 100.0), (F32, BF16, 0.5, 1e4), (BF16, F32, 1.0, 100.0), (BF16, BF16, 2.0, 1e4)]


def grid() -> list:
    return FULL if os.environ.get("KL_SHIFT_FULL") == "1" else SPARSE


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """triton: the kernels under the interpreter (= CUDA); torch: the pure-torch twins."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "triton" else "0")
    return request.param


def row_offsets(off: float) -> torch.Tensor:
    """(N, 1) per-row offsets of alternating sign and varied size (teacher above / below)."""
    sign = torch.tensor([(-1.0) ** r for r in range(N)])
    return (off * sign * torch.linspace(0.5, 1.5, N))[:, None]


def check(worst: dict, name, ours, theirs, ref, cfg) -> None:
    """Asserts the rule; records error / tolerance under the issue's plain rule (floor 1e-6) in
    ``worst`` per kind (loss, fp32 / bf16 gradients)."""
    e_ours, e_torch = rel_err(ours, ref), rel_err(theirs, ref)
    floor = FLOOR if name == "loss" else GRAD_FLOOR[ours.dtype]
    tol = max(2 * e_torch, floor)
    assert e_ours <= tol, f"{name} {cfg}: error {e_ours:.3g} > {tol:.3g} (torch fp32 {e_torch:.3g})"
    kind = "loss" if name == "loss" else f"grad {DT[ours.dtype]}"
    worst[kind] = max(worst.get(kind, 0.0), e_ours / max(2 * e_torch, FLOOR))


def report(what: str, worst: dict) -> None:
    print(f"\nworst ratio {what}: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(worst.items())))


def dyadic(*shape, scale=1.0) -> torch.Tensor:
    """Multiples of 1/8 in [-2, 2] (exact in bf16): every logit h W^T below is exact in fp32, so
    ours and torch's F.linear form the same logits and only the divergence's numerics differ."""
    return torch.randint(-16, 17, shape).float() / 8 * scale


def run(fn, leaves, g):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    (out.double() * g).sum().backward()
    return out, [t.grad for t in leaves]


def distill_case(worst: dict, divergence: str, sd, td, T: float, off: float) -> None:
    """One distillation_loss configuration, inputs drawn from the current RNG state."""
    base = torch.randn(N, C) * 2
    s = base.to(sd)
    t = (torch.randn(N, C) * 2 + 0.5 * base + row_offsets(off)).to(td)
    g = torch.randn(N, dtype=F64)
    kw = dict(divergence=divergence, temperature=T, reduction="none", beta=0.3)
    with launch.overrides(block_c=128):  # 2 blocks: the references move
        ours, (dx,) = run(lambda x: xent_triton.distillation_loss(x, t, **kw), [s], g)
    ref, (dref,) = run(lambda x: composed(x, t.double(), None, **kw), [s.double()], g)
    theirs, (dth,) = run(lambda x: composed(x, t.float(), None, **kw), [s.float()], g)
    cfg = (str(sd), str(td), T, off)
    check(worst, "loss", ours, theirs, ref, cfg)
    check(worst, "grad", dx, dth.to(sd), dref, cfg)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_distillation_loss_shift_invariant(path, divergence):
    torch.manual_seed(0)
    worst: dict = {}
    for sd, td, T, off in grid():
        distill_case(worst, divergence, sd, td, T, off)
    report(f"distillation_loss {divergence} {path}", worst)


# fp32 gradients where the earlier backward (per-class log q - log p or log q - log m, each through
# the rounded lses, minus its row mean D or K) exceeded the 1e-6 rule: a bf16 teacher
# at T = 0.5 (p near one class that q does not favour: the per-class term of every other class is
# nearly its mean). Seed 39 failed on the torch path (2.01e-6 > 1.52e-6); the kernels' failures
# before the fix showed in the KL_SHIFT_FULL=1 grid (docs/kl.md)
CANCELLATION = [
    pytest.param("jsd", 39, id="jsd-seed39"),
]


@pytest.mark.parametrize("divergence,seed", CANCELLATION)
def test_fp32_gradient_no_cancellation(path, divergence, seed):
    torch.manual_seed(seed)
    distill_case({}, divergence, F32, BF16, 0.5, 100.0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_linear_distillation_loss_shift_invariant(path, divergence):
    """The offset rides on a hidden feature (exact in every dtype): logits = h W^T with h[:, 0] =
    the offset and W[:, 0] = 1 (dyadic inputs). torch's own: F.linear in the hidden's dtype, then
    fp32."""
    torch.manual_seed(1)
    worst: dict = {}
    for sd, td, T, off in grid():
        hs, ws, ht, wt = dyadic(N, D), dyadic(C, D), dyadic(N, D), dyadic(C, D)
        ht[:, :1] = row_offsets(off).to(BF16).float()
        wt[:, 0] = 1.0
        hs, ws, ht, wt = hs.to(sd), ws.to(sd), ht.to(td), wt.to(td)
        g = torch.randn(N, dtype=F64)
        kw = dict(divergence=divergence, temperature=T, reduction="none", beta=0.3)
        with launch.overrides(block_c=128):
            ours, grads = run(lambda h, w: xent_triton.linear_distillation_loss(h, w, ht, wt, chunk_size=3,
                                                                               **kw), [hs, ws], g)
        ref, rgrads = run(lambda h, w: composed(F.linear(h, w), F.linear(ht.double(), wt.double()),
                                                None, **kw), [hs.double(), ws.double()], g)
        theirs, tgrads = run(lambda h, w: composed(F.linear(h, w).float(), F.linear(ht, wt).float(),
                                                   None, **kw), [hs, ws], g)
        cfg = (str(sd), str(td), T, off)
        check(worst, "loss", ours, theirs, ref, cfg)
        for n, a, b, r in zip(("dh", "dW"), grads, tgrads, rgrads):
            check(worst, n, a, b.to(sd), r, cfg)
    report(f"linear_distillation_loss {divergence} {path}", worst)
