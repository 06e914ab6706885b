"""Class-probability targets as torch has them: any float dtype beside the logits' (fp32 teacher
probabilities with bf16 logits, and the reverse), and a gradient with respect to the target when
it requires grad (written by the backward pass that already reads the row), on both CPU paths."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xent_triton as xt
from tolerances import assert_close_rule

PATHS = [pytest.param("1", id="triton"), pytest.param("0", id="torch")]
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", request.param)
    return request.param


CASES = [
    pytest.param((6, 300), BF16, F32, dict(label_smoothing=0.1, weight=True),
                 id="N6-C300-bf16-logits-fp32-probs"),
    pytest.param((6, 300), F32, BF16, {}, id="N6-C300-fp32-logits-bf16-probs"),
    pytest.param((6, 300), F16, F32, dict(softcap=5.0), id="N6-C300-fp16-logits-fp32-probs-softcap"),
    pytest.param((3, 200, 4), F32, F32, dict(label_smoothing=0.2), id="N3-C200-D4-fp32-smooth"),
    pytest.param((4, 50257), BF16, F32, {}, id="N4-C50257-bf16-fp32"),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,xdt,tdt,opts", CASES)
def test_soft_target_dtype_and_gradient(path, shape, xdt, tdt, opts, reduction):
    opts = dict(opts)
    C = shape[1]
    w = torch.rand(C) + 0.5 if opts.pop("weight", False) else None
    x = (torch.randn(shape) * 2).to(xdt).requires_grad_()
    t = torch.softmax(torch.randn(shape), 1).to(tdt).requires_grad_()
    loss = xt.cross_entropy(x, t, w, reduction=reduction, **opts)
    up = (torch.rand(loss.shape) + 0.5)
    (loss * up).sum().backward()

    softcap = opts.pop("softcap", None)

    def torch_loss(xx, tt):
        z = softcap * torch.tanh(xx / softcap) if softcap else xx
        return F.cross_entropy(z, tt, None if w is None else w.to(xx.dtype), reduction=reduction, **opts)

    xd = x.detach().double().requires_grad_()
    td = t.detach().double().requires_grad_()
    ref = torch_loss(xd, td)
    (ref * up.double()).sum().backward()
    assert_close_rule("loss", loss, None, ref, F32)
    assert_close_rule("dx", x.grad, None, xd.grad, xdt)
    assert x.grad.dtype == xdt and t.grad.dtype == tdt
    assert_close_rule("dtarget", t.grad, None, td.grad, tdt)


def test_float64_probabilities_with_fp32_logits(path):
    """A target of a wider dtype than the logits (torch accepts it): no error, no copy, torch's value."""
    x = torch.randn(4, 50, requires_grad=True)
    t = torch.softmax(torch.randn(4, 50, dtype=torch.float64), 1)
    xt.cross_entropy(x, t).backward()
    xd = x.detach().double().requires_grad_()
    F.cross_entropy(xd, t).backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=1e-6, rtol=1e-5)
