"""The plain-CPU (torch) path of ``linear_token_logprobs``: passes over the (rows, C) logits chunk
(issue 19 item 4: the TRL SFT head's time). Each elementwise op or reduction that reads or writes a
(rows, C) tensor is one pass; the GEMMs, one-per-row gathers / scatters and views are not counted.
Values are checked against float64 in tests/integrations/test_trl_one_pass.py and
tests/kl/test_token_logprobs.py."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import xent_triton
from xent_triton.kl import rows_torch
from xent_triton.kl.options import KLOptions

NOT_PASSES = {"mm", "addmm", "addmm_", "gather", "scatter_add_", "empty", "empty_strided", "new_empty"}


class Passes(TorchDispatchMode):
    """Counts the ops over tensors of >= ``big`` elements and the new ones of >= ``big`` they allocate."""

    def __init__(self, big: int):
        super().__init__()
        self.big, self.ops, self.allocs = big, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        if func.is_view or name in NOT_PASSES:
            return out
        if any(isinstance(t, torch.Tensor) and t.numel() >= self.big for t in flat):
            self.ops.append(name)
            ins = {t.data_ptr() for t in flat if isinstance(t, torch.Tensor)}
            self.allocs += [name for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)
                            and t.numel() >= self.big and t.data_ptr() not in ins]
        return out


CASES = [  # rows, C, temperature, entropy (forward), entropy gradient (backward), forward / backward passes
    pytest.param(29, 3001, 0.7, True, False, 8, 4, id="T0.7-entropy-logged"),
    pytest.param(29, 3001, 1.0, True, False, 7, 3, id="T1-entropy-logged"),
    pytest.param(29, 3001, 0.7, True, True, 8, 7, id="T0.7-entropy-in-loss"),
    pytest.param(29, 3001, 1.0, False, False, 4, 3, id="T1-log-probs-only"),
]


@pytest.mark.parametrize("R,C,T,ent,ent_grad,fwd,bwd", CASES)
def test_chunk_passes_of_the_torch_path(R, C, T, ent, ent_grad, fwd, bwd):
    """The linear head's chunk step (kl/linear.py): forward on its own logits buffer (``scratch``),
    backward writing dL/dz over it (``out`` = the buffer), as on the plain-CPU path."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(R, C, generator=g) * 2
    y = torch.randint(0, C, (R,), generator=g)
    dlp, dent = torch.randn(R, generator=g), torch.randn(R, generator=g)  # upstream != 1
    work = z.clone()
    with Passes(C) as f:
        opts = KLOptions(temperature=T, return_entropy=ent)
        _lp, h, stats = rows_torch.logprobs_forward(work, y, opts, scratch=True)
    work.copy_(z)
    with Passes(C) as b:
        rows_torch.logprobs_backward(work, y, h, stats, dlp, dent if ent_grad else None, opts, out=work)
    assert (len(f.ops), len(b.ops)) == (fwd, bwd), (f.ops, b.ops)
    assert f.allocs == [] and b.allocs == [], (f.allocs, b.allocs)  # no (rows, C) temporaries


@pytest.mark.parametrize("linear", [True, False], ids=["linear_token_logprobs", "token_logprobs"])
def test_unused_entropy_adds_no_backward_term(linear, monkeypatch):
    """Entropy returned for logging only (SFT): its gradient reaches the backward as None, not zeros."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    seen = []
    real = rows_torch.logprobs_backward
    monkeypatch.setattr(rows_torch, "logprobs_backward", lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    h, w = torch.randn(7, 8, requires_grad=True), torch.randn(301, 8, requires_grad=True)
    y = torch.randint(0, 301, (7,))
    if linear:
        lp, _ent = xent_triton.linear_token_logprobs(h, w, y, return_entropy=True)
    else:
        lp, _ent = xent_triton.token_logprobs(h @ w.T, y, return_entropy=True)
    lp.sum().backward()
    assert seen == [None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_leaves_the_callers_logits_unchanged(dtype, monkeypatch):
    """``token_logprobs`` on given logits works on copies of its row blocks (the linear head's own
    chunk is overwritten in place)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    z = (torch.randn(11, 503) * 2).to(dtype).requires_grad_()
    kept = z.detach().clone()
    y = torch.randint(0, 503, (11,))
    lp, ent = xent_triton.token_logprobs(z, y, temperature=0.9, return_entropy=True)
    (lp * torch.randn(11)).sum().add(ent.sum()).backward()
    assert torch.equal(z.detach(), kept)
