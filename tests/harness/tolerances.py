"""The one tolerance rule of the test suite.

error(a) = max |a - ref| / max |ref|  (ref = float64 PyTorch on the same, already-rounded inputs).
Ours must satisfy error(ours) <= max(2 * error(torch in the same dtype), FLOOR[dtype]).
Non-finite entries must match the reference exactly (same NaN / +-inf positions).
"""
import torch

FLOOR = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-10}
TORCH_FACTOR = 2.0


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    fin = torch.isfinite(ref)
    if not fin.any():
        return 0.0
    scale = ref[fin].abs().max().clamp_min(1e-300)
    return float(((a[fin] - ref[fin]).abs().max() / scale).nan_to_num(float("inf")))


def assert_close_rule(name: str, ours: torch.Tensor, theirs, ref: torch.Tensor, dtype: torch.dtype):
    """Assert the rule above; ``theirs`` is torch's own result in ``dtype`` (or None: floor only)."""
    ours_d, ref_d = ours.detach().double().cpu(), ref.detach().double().cpu()
    assert ours_d.shape == ref_d.shape, f"{name}: shape {tuple(ours_d.shape)} != {tuple(ref_d.shape)}"
    nonfinite = ~torch.isfinite(ref_d)
    assert torch.equal(nonfinite, ~torch.isfinite(ours_d)), \
        f"{name}: non-finite entries differ from reference"
    assert torch.equal(ours_d[nonfinite].nan_to_num(0.0), ref_d[nonfinite].nan_to_num(0.0)), \
        f"{name}: +-inf entries differ from reference"
    e_ours = rel_err(ours_d, ref_d)
    e_torch = rel_err(theirs, ref_d) if theirs is not None else 0.0
    tol = max(TORCH_FACTOR * e_torch, FLOOR[dtype])
    assert e_ours <= tol, \
        f"{name}: error {e_ours:.3g} > tolerance {tol:.3g} (torch's own error {e_torch:.3g})"
    return e_ours, e_torch
