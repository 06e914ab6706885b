"""A fast end-to-end check of the public API (one case per entry point)."""
import torch

import xent_triton
from reference import cross_entropy_composed
from tolerances import assert_close_rule


def test_functional_and_module_match_reference(device):
    x = torch.randn(16, 1000, device=device, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 1000, (16,), device=device)
    y[3] = -100
    for fn in (xent_triton.cross_entropy, xent_triton.CrossEntropyLoss()):
        x.grad = None
        loss = fn(x, y)
        loss.backward(torch.tensor(0.5, device=device))
        x64 = x.detach().double().requires_grad_()
        ref = cross_entropy_composed(x64, y)
        ref.backward(torch.tensor(0.5, device=device, dtype=torch.float64))
        assert loss.dtype == torch.float32
        assert x.grad.dtype == torch.bfloat16
        assert_close_rule("loss", loss, None, ref, torch.bfloat16)
        assert_close_rule("grad", x.grad, None, x64.grad, torch.bfloat16)
