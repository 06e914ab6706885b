"""Smoke test of an INSTALLED xent_triton: ``python -I wheel_smoke.py VERSION`` from a directory
outside the repository, in the fresh environment .ci/package_check.sh made (the built wheel
installed there, not editable). Fails unless:

* ``xent_triton`` is imported from that environment's site-packages (not the source tree), and its
  installed metadata lists ``py.typed``;
* ``__version__`` and the installed distribution's version both equal VERSION;
* one loss forward + backward on CPU (``cross_entropy`` and ``linear_cross_entropy``, random inputs,
  upstream gradient 0.5) matches float64 torch. With ``TRITON_INTERPRET=1`` in the environment the
  Triton kernels run under the interpreter, otherwise the pure-torch path.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import pathlib
import sys
import sysconfig

import torch

import xent_triton


def check_install(version: str) -> None:
    site = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
    where = pathlib.Path(xent_triton.__file__).resolve()
    assert where.is_relative_to(site), f"xent_triton imported from {where}, not from {site}"
    assert xent_triton.__version__ == version, (xent_triton.__version__, version)
    dist = md.distribution("xent-triton")
    assert dist.version == version, (dist.version, version)
    files = {f.as_posix() for f in dist.files or ()}
    assert "xent_triton/py.typed" in files, "the installed wheel has no xent_triton/py.typed"


def check_losses() -> None:
    g = torch.Generator().manual_seed(23)
    N, D, C = 7, 19, 131
    x = torch.randn(N, C, generator=g, requires_grad=True)
    h = torch.randn(N, D, generator=g, requires_grad=True)
    w = (torch.randn(C, D, generator=g) / D ** 0.5).requires_grad_()
    y = torch.randint(0, C, (N,), generator=g)
    up = torch.tensor(0.5)
    cases = [("cross_entropy", xent_triton.cross_entropy, (x,), lambda a: a),
             ("linear_cross_entropy", xent_triton.linear_cross_entropy, (h, w),
              lambda a, b: torch.nn.functional.linear(a, b))]
    for name, fn, args, logits in cases:
        loss = fn(*args, y)
        grads = torch.autograd.grad(loss, args, up)
        args64 = [a.detach().double().requires_grad_() for a in args]
        ref = torch.nn.functional.cross_entropy(logits(*args64), y)
        refs = torch.autograd.grad(ref, args64, up.double())
        for what, got, want in [("loss", loss, ref)] + [(f"grad{i}", a, b) for i, (a, b) in
                                                        enumerate(zip(grads, refs))]:
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            assert err <= 2e-5, f"{name} {what}: relative error {err:.2e} > 2e-5 (fp32 floor)"
        print(f"  {name}: loss {loss.item():.6f} (float64 {ref.item():.6f}), gradients match")


if __name__ == "__main__":
    check_install(sys.argv[1])
    mode = "Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "torch path"
    print(f"xent_triton {xent_triton.__version__} from {pathlib.Path(xent_triton.__file__).parent} "
          f"(cwd {os.getcwd()}; {mode})")
    check_losses()
