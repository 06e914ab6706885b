"""softcap and token_weight in the KL family (issue 21, acceptance 1): every divergence x
reduction x T in {0.5, 1, 2}, with and without a target, fp32 and bf16 students, both CPU paths
(Triton kernels under the interpreter, the torch path), against a float64 torch composition under
the tolerance rule of tests/harness/tolerances.py (torch's own error: the same composition with the
student in its dtype). The cap is applied to both models' logits BEFORE the temperature:
softmax(softcap tanh(z / softcap) / T).

CI runs a covering subset (each divergence x reduction x T once, target / dtype / path rotated);
``KL_SOFTCAP_FULL=1`` runs the whole cross-product. Ids read fn-divergence-T-reduction-target-dtype-path.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from tolerances import assert_close_rule

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's masked lanes

F32, BF16 = torch.float32, torch.bfloat16
DT = {F32: "fp32", BF16: "bf16"}
CAP = 3.0  # below the logits' spread (|z| up to ~8): the cap bends them
FULL = os.environ.get("KL_SOFTCAP_FULL") == "1"


def cap(z):
    return CAP * torch.tanh(z / CAP)


def composed_rows(s, t, target, divergence, beta, T, ce_weight, ignore_index=-100):
    """Per-token loss of the capped logits with torch's ops (float64 inputs: the truth)."""
    zs, zt = cap(s), cap(t.to(s.dtype))
    lq, lp = F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1)
    p, q = lp.exp(), lq.exp()
    zero = torch.zeros((), dtype=lq.dtype)
    if divergence == "kl":
        d = torch.where(p > 0, p * (lp - lq), zero).sum(-1)
    elif divergence == "reverse_kl":
        d = torch.where(q > 0, q * (lq - lp), zero).sum(-1)
    else:
        lm = torch.log(beta * p + (1 - beta) * q)
        d = beta * torch.where(p > 0, p * (lp - lm), zero).sum(-1) + (1 - beta) * torch.where(
            q > 0, q * (lq - lm), zero).sum(-1)
    if target is None:
        return d, torch.ones(d.shape, dtype=torch.bool)
    valid = target != ignore_index
    if ce_weight:
        ce = F.cross_entropy(zs.reshape(-1, zs.shape[-1]), target.reshape(-1), reduction="none",
                             ignore_index=ignore_index).view(d.shape)
        d = ce_weight * ce + (1 - ce_weight) * d
    return torch.where(valid, d, zero), valid


def reduce(rows, valid, tw, reduction):
    rows = rows * tw.to(rows.dtype)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / torch.where(valid, tw.to(rows.dtype), 0.0).sum()


def use_path(monkeypatch, path: str) -> None:
    if path == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run under the interpreter here")


def inputs(shape, dtype, with_target, gen):
    s = (torch.randn(shape, generator=gen) * 3).to(dtype)
    t = torch.randn(shape, generator=gen) * 3 + 0.5 * s.float()
    tw = torch.rand(shape[:-1], generator=gen) * 2  # random positive weights, never all ones
    target = None
    if with_target:
        target = torch.randint(0, shape[-1], shape[:-1], generator=gen)
        target.view(-1)[::3] = -100
    return s, t, tw, target


DIVS, REDS, TEMPS = ("kl", "reverse_kl", "jsd"), ("none", "sum", "mean"), (0.5, 1.0, 2.0)
ALL = list(itertools.product(DIVS, TEMPS, REDS, (False, True), (F32, BF16), ("kernels", "torch")))
CI = [(d, T, r, i % 2 == 1, (F32, BF16)[(i // 2) % 2], path)
      for i, (d, T, r) in enumerate(itertools.product(DIVS, TEMPS, REDS)) for path in ("kernels", "torch")]
GRID = [pytest.param(*c, id=f"distill-{c[0]}-T{c[1]:g}-{c[2]}-{'target' if c[3] else 'none'}-"
                           f"{DT[c[4]]}-{c[5]}") for c in (ALL if FULL else CI)]


@pytest.mark.parametrize("divergence, T, reduction, with_target, dtype, path", GRID)
def test_distillation_softcap_token_weight(monkeypatch, divergence, T, reduction, with_target, dtype, path):
    use_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(sum(map(ord, f"{divergence}{T}{reduction}{with_target}")))
    s, t, tw, target = inputs((2, 3, 301), dtype, with_target, gen)
    kw = dict(divergence=divergence, beta=0.3, temperature=T, ce_weight=0.25 if with_target else 0.0)
    x = s.clone().requires_grad_(True)
    ours = xent_triton.distillation_loss(x, t, target, reduction=reduction, softcap=CAP, token_weight=tw,
                                         **kw)
    g = torch.randn(ours.shape, dtype=torch.float64, generator=gen) + 1.5  # upstream != 1
    (ours.double() * g).sum().backward()
    runs = []
    for src, tt in ((s.double(), t.double()), (s, t)):  # the truth, then torch in the student's dtype
        leaf = src.detach().clone().requires_grad_(True)
        rows, valid = composed_rows(leaf, tt, target, divergence, 0.3, T, kw["ce_weight"])
        out = reduce(rows, valid, tw, reduction)
        (out.double() * g).sum().backward()
        runs.append((out, leaf.grad))
    (ref, ref_g), (theirs, theirs_g) = runs
    assert_close_rule("loss", ours, theirs, ref, dtype)
    assert x.grad.dtype == dtype
    assert_close_rule("grad", x.grad, theirs_g, ref_g, dtype)


LP_ALL = list(itertools.product(TEMPS, (False, True), (F32, BF16), ("kernels", "torch")))
LP_CI = [(T, i % 2 == 0, (F32, BF16)[i % 2], path) for i, T in enumerate(TEMPS)
         for path in ("kernels", "torch")]
LP_GRID = [pytest.param(*c, id=f"logprobs-T{c[0]:g}-{'ent' if c[1] else 'lp'}-{DT[c[2]]}-{c[3]}")
           for c in (LP_ALL if FULL else LP_CI)]


@pytest.mark.parametrize("T, entropy, dtype, path", LP_GRID)
def test_token_logprobs_softcap_token_weight(monkeypatch, T, entropy, dtype, path):
    use_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(7)
    x0, _, tw, _ = inputs((2, 5, 257), dtype, False, gen)
    tok = torch.randint(0, 257, (2, 5), generator=gen)
    ups = [torch.randn(2, 5, dtype=torch.float64, generator=gen) + 1.5 for _ in range(2)]
    x = x0.clone().requires_grad_(True)
    ours = xent_triton.token_logprobs(x, tok, temperature=T, return_entropy=entropy, softcap=CAP,
                                      token_weight=tw)
    ours = ours if entropy else (ours,)
    sum(((o.double() * u).sum() for o, u in zip(ours, ups))).backward()
    runs = []
    for src in (x0.double(), x0):
        leaf = src.detach().clone().requires_grad_(True)
        lq = F.log_softmax(cap(leaf) / T, -1)
        outs = (lq.gather(-1, tok[..., None])[..., 0] * tw.to(lq.dtype),
                -(lq.exp() * lq).sum(-1) * tw.to(lq.dtype))[:len(ours)]
        sum(((o.double() * u).sum() for o, u in zip(outs, ups))).backward()
        runs.append((outs, leaf.grad))
    (ref, ref_g), (theirs, theirs_g) = runs
    for name, o, th, r in zip(("logprob", "entropy"), ours, theirs, ref):
        assert_close_rule(name, o, th, r, dtype)
    assert_close_rule("grad", x.grad, theirs_g, ref_g, dtype)


@pytest.mark.parametrize("path", ["kernels", "torch"])
@pytest.mark.parametrize("divergence", DIVS)
def test_linear_forms_softcap_token_weight(monkeypatch, path, divergence):
    """The linear forms (chunked: 2 chunks of 3 tokens) equal their logits functions on F.linear's
    logits, values and every student gradient, with softcap and token_weight."""
    use_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(11)
    N, D, Dt, C = 6, 8, 5, 129
    h, w = torch.randn(N, D, generator=gen), torch.randn(C, D, generator=gen)
    b = torch.randn(C, generator=gen)
    ht, wt = torch.randn(N, Dt, generator=gen), torch.randn(C, Dt, generator=gen)
    target = torch.randint(0, C, (N,), generator=gen)
    target[1] = -100
    tw = torch.rand(N, generator=gen) + 0.5
    kw = dict(divergence=divergence, temperature=1.5, softcap=CAP, token_weight=tw, ce_weight=0.2, beta=0.4)

    def grads(fn, leaves):
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        sum((o * (1.0 + i)).sum() for i, o in enumerate(outs)).backward()
        return [o.detach() for o in outs] + [leaf.grad for leaf in leaves]

    def fresh():
        return [v.clone().requires_grad_(True) for v in (h, w, b)]

    got = grads(lambda hh, ww, bb: xent_triton.linear_distillation_loss(
        hh, ww, ht, wt, target, linear_bias=bb, chunk_size=3, **kw), fresh())
    want = grads(lambda hh, ww, bb: xent_triton.distillation_loss(
        F.linear(hh, ww, bb), F.linear(ht, wt), target, **kw), fresh())
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    lkw = dict(temperature=0.7, softcap=CAP, token_weight=tw, return_entropy=True)
    ids = target.clamp_min(0)
    got = grads(lambda hh, ww, bb: xent_triton.linear_token_logprobs(hh, ww, ids, linear_bias=bb,
                                                                     chunk_size=4, **lkw), fresh())
    want = grads(lambda hh, ww, bb: xent_triton.token_logprobs(F.linear(hh, ww, bb), ids, **lkw), fresh())
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("call", [
    lambda x, t, y: xent_triton.distillation_loss(x, t, y, softcap=0.0),
    lambda x, t, y: xent_triton.token_logprobs(x, y, softcap=-1.0),
    lambda x, t, y: xent_triton.distillation_loss(x, t, y, token_weight=torch.ones(3)),
    lambda x, t, y: xent_triton.token_logprobs(x, y, token_weight=torch.ones(4, dtype=torch.long)),
], ids=["distill-softcap0", "logprobs-softcap-neg", "distill-tw-shape", "logprobs-tw-int"])
def test_bad_softcap_or_token_weight_raises(call):
    x, t, y = torch.randn(4, 9), torch.randn(4, 9), torch.randint(0, 9, (4,))
    with pytest.raises((TypeError, ValueError), match="softcap|token_weight"):
        call(x, t, y)
