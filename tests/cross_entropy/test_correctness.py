"""Correctness of ``xent_triton.cross_entropy`` against float64 PyTorch, for loss, lse and gradient.

Every case goes through ``cases.check``: the tolerance rule of tests/harness/tolerances.py (error at most
twice PyTorch's own error in the same dtype, or the dtype floor), identical non-finite entries
(outputs start as NaN, so an element the kernels never write fails), and exactly zero loss and
gradient on ignored rows. The tables below are the test plan; ids read N-C-dtype-options.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from cases import BF16, F16, F32, check, class_ids, class_weight, logits, pid, probabilities
from tolerances import assert_close_rule
from xent_triton.core import launch, runtime


def case(shape: tuple, dtype: torch.dtype, spec: dict, id: str):
    """A table row (shape, dtype, spec)."""
    return pytest.param(shape, dtype, spec, id=id)


def run_spec(device: str, shape: tuple, dtype: torch.dtype, spec: dict):
    """Build the inputs a table row describes and check them; returns (x, target, weight, ours).

    spec keys besides the library's keyword options: weight (bool), ignore_frac, index_dtype,
    scale (logit magnitude), layout, soft (bool), use_lse (bool).
    """
    spec = dict(spec)
    weighted, soft = spec.pop("weight", False), spec.pop("soft", False)
    frac, idx = spec.pop("ignore_frac", 0.0), spec.pop("index_dtype", torch.int64)
    x = logits(shape, dtype, device, scale=spec.pop("scale", 1.0), layout=spec.pop("layout", "contiguous"))
    C = shape[0] if len(shape) == 1 else shape[1]
    y = probabilities(x) if soft else class_ids(x, ignore_index=spec.get("ignore_index", -100),
                                                  ignore_frac=frac, index_dtype=idx)
    w = class_weight(C, dtype, device) if weighted else None
    return x, y, w, check(x, y, w, **spec)


IGN = dict(ignore_frac=0.25)
ALL = dict(weight=True, ignore_index=5, ignore_frac=0.3, label_smoothing=0.1, lse_square_scale=1e-2,
           softcap=6.0, logit_scale=1.7, scale=3.0, use_lse=True, inplace_backward=True)

# --- vocabulary sizes: tiny C with many rows, large C with few rows -----------------------------
SIZES = [
    *[case((64, C), dt, IGN, id=pid("N64", f"C{C}", dt)) for C in (1, 2, 3) for dt in (F32, BF16, F16)],
    *[case((32, 1000), dt, IGN, id=pid("N32-C1000", dt)) for dt in (F32, BF16, F16)],
    case((8, 32003), F32, dict(IGN, reduction="sum"), id="N8-C32003-fp32-sum"),
    case((8, 50257), BF16, dict(label_smoothing=0.1), id="N8-C50257-bf16-smooth0.1"),
    case((4, 128256), BF16, dict(weight=True, lse_square_scale=1e-3, use_lse=True, reduction="none"),
                 id="N4-C128256-bf16-weight-zloss-lse-none"),
    case((4, 262144), BF16, dict(IGN, softcap=15.0), id="N4-C262144-bf16-ignore-softcap15"),
    case((4, 262144), F16, dict(ALL, reduction="sum"), id="N4-C262144-fp16-all-sum"),
]


@pytest.mark.parametrize("shape,dtype,spec", SIZES)
def test_vocabulary_sizes(device, shape, dtype, spec):
    run_spec(device, shape, dtype, spec)


# --- every option alone, in every dtype ----------------------------------------------------------
ALONE = {
    "plain-mean": {},
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "weight": dict(weight=True),
    "ignore-100": dict(IGN),
    "ignore5": dict(IGN, ignore_index=5),
    "smooth0.1": dict(label_smoothing=0.1),
    "zloss1e-2": dict(lse_square_scale=1e-2),
    "softcap5": dict(softcap=5.0, scale=4.0),
    "scale0.5": dict(logit_scale=0.5, scale=3.0),
    "lse-returned": dict(return_lse=True),
    "lse-used": dict(use_lse=True),
    "inplace": dict(inplace_backward=True),
    "int32": dict(IGN, index_dtype=torch.int32),
}


@pytest.mark.parametrize("dtype,spec", [pytest.param(dt, v, id=pid("N16-C1000", dt, k))
                                        for k, v in ALONE.items() for dt in (F32, BF16, F16)])
def test_option_alone(device, dtype, spec):
    run_spec(device, (16, 1000), dtype, spec)


# --- options combined ----------------------------------------------------------------------------
COMBINED = [
    *[pytest.param(dict(ALL, reduction=r), dt, id=pid("N16-C1000", dt, "all", r))
      for r in ("mean", "sum", "none") for dt in (F32, BF16, F16)],
    pytest.param(dict(IGN, weight=True), BF16, id="N16-C1000-bf16-weight-ignore-mean"),
    pytest.param(dict(IGN, weight=True, label_smoothing=0.2), F32,
                 id="N16-C1000-fp32-weight-ignore-smooth0.2"),
    pytest.param(dict(IGN, ignore_index=5, label_smoothing=0.1, reduction="none"), BF16,
                 id="N16-C1000-bf16-ignore5-smooth0.1-none"),
    pytest.param(dict(softcap=3.0, logit_scale=2.5, scale=2.0), F16, id="N16-C1000-fp16-softcap3-scale2.5"),
    pytest.param(dict(IGN, lse_square_scale=1e-2, reduction="none"), BF16,
                 id="N16-C1000-bf16-ignore-zloss-none"),
    pytest.param(dict(IGN, ignore_index=5, lse_square_scale=1e-2, label_smoothing=0.1, weight=True), F16,
                 id="N16-C1000-fp16-ignore5-zloss-smooth-weight"),
    pytest.param(dict(IGN, lse_square_scale=0.1, use_lse=True, reduction="none"), F32,
                 id="N16-C1000-fp32-ignore-zloss0.1-lse-used-none"),
    pytest.param(dict(IGN, lse_square_scale=1e-2, use_lse=True, inplace_backward=True,
                      index_dtype=torch.int32), BF16, id="N16-C1000-bf16-ignore-zloss-lse-inplace-int32"),
    pytest.param(dict(label_smoothing=1.0, weight=True, reduction="sum"), F32,
                 id="N16-C1000-fp32-smooth1.0-weight"),
]


@pytest.mark.parametrize("spec,dtype", COMBINED)
def test_options_combined(device, spec, dtype):
    run_spec(device, (16, 1000), dtype, spec)


def test_inplace_gradient_equals_out_of_place(device):
    """inplace_backward gives the same gradient bit for bit (and writes it into the input)."""
    x, y, _, _ = run_spec(device, (16, 1000), BF16, dict(IGN, label_smoothing=0.1))
    spec = dict(label_smoothing=0.1, lse_square_scale=1e-2, return_lse=True)
    grads = []
    for inplace in (False, True):
        leaf = x.detach().clone().requires_grad_()
        inp = leaf.clone()
        loss, lse = xent_triton.cross_entropy(inp, y, inplace_backward=inplace, **spec)
        (loss * 0.37 + lse.sum() * 0.25).backward()
        grads.append(leaf.grad)
        assert torch.equal(inp.detach(), leaf.grad) == inplace
    assert torch.equal(grads[0], grads[1])


# --- ignored rows ----------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype,use_lse,extra", [
    pytest.param(BF16, False, {}, id="N8-C1000-bf16"),
    pytest.param(F32, False, dict(weight=True, label_smoothing=0.1, lse_square_scale=1e-2),
                 id="N8-C1000-fp32-weight-smooth-zloss"),
    pytest.param(F16, True, dict(lse_square_scale=1e-2), id="N8-C1000-fp16-zloss-lse-used"),
])
def test_all_rows_ignored(device, dtype, use_lse, extra, reduction):
    """mean -> NaN (0/0, like torch), sum -> 0, none -> zeros; gradient zero (p * dlse with lse used)."""
    x, y, _, ours = run_spec(device, (8, 1000), dtype, dict(extra, ignore_frac=1.0, reduction=reduction,
                                                         use_lse=use_lse))
    assert torch.all(y == -100)
    if reduction == "mean":
        assert torch.isnan(ours.loss)
    else:
        assert torch.all(ours.loss == 0)
    if not use_lse:
        assert torch.all(ours.grad == 0)
    else:  # only the lse term reaches the logits (dlse * softmax): every row gets a gradient
        assert (ours.grad != 0).any(dim=1).all()


# --- soft targets (class probabilities) ------------------------------------------------------------
SOFT = [
    case((16, 1000), BF16, dict(), id="N16-C1000-bf16-mean"),
    case((16, 1000), F32, dict(reduction="sum"), id="N16-C1000-fp32-sum"),
    case((16, 1000), F16, dict(reduction="none"), id="N16-C1000-fp16-none"),
    case((16, 1000), BF16, dict(label_smoothing=0.1), id="N16-C1000-bf16-smooth0.1"),
    case((16, 1000), F32, dict(weight=True), id="N16-C1000-fp32-weight"),
    case((16, 1000), F16, dict(weight=True, label_smoothing=0.2, reduction="sum"),
                 id="N16-C1000-fp16-weight-smooth0.2-sum"),
    case((16, 1000), F32, dict(ALL, ignore_frac=0.0, ignore_index=-100), id="N16-C1000-fp32-all"),
    case((8, 50257), BF16, dict(weight=True, label_smoothing=0.1, use_lse=True),
                 id="N8-C50257-bf16-weight-smooth0.1-lse-used"),
    case((4, 300, 5), F32, dict(label_smoothing=0.1, reduction="none"), id="N4-C300-D5-fp32-smooth-none"),
    case((1000,), BF16, dict(weight=True), id="C1000-bf16-1d-weight"),
    case((16, 1000), BF16, dict(layout="transposed", reduction="sum"), id="N16-C1000-bf16-transposed-sum"),
]


@pytest.mark.parametrize("shape,dtype,spec", SOFT)
def test_soft_targets(device, shape, dtype, spec):
    run_spec(device, shape, dtype, dict(spec, soft=True))


# --- K-dim and 1-D inputs ---------------------------------------------------------------------------
KDIM = [
    case((4, 300, 7), BF16, dict(IGN), id="N4-C300-d7-bf16-ignore-mean"),
    case((4, 300, 7), F32, dict(IGN, weight=True, reduction="none"), id="N4-C300-d7-fp32-weight-none"),
    case((3, 300, 3, 4), F16, dict(IGN, label_smoothing=0.1, reduction="sum"),
                 id="N3-C300-3x4-fp16-smooth-sum"),
    case((3, 300, 3, 4), BF16, dict(ALL, reduction="none"), id="N3-C300-3x4-bf16-all-none"),
    case((2, 50257, 3), BF16, dict(IGN, use_lse=True), id="N2-C50257-d3-bf16-lse-used"),
    case((1000,), F32, {}, id="C1000-fp32-1d"),
    case((1000,), BF16, dict(reduction="none", weight=True, use_lse=True),
         id="C1000-bf16-1d-weight-lse-none"),
    case((1000,), F16, dict(ALL, reduction="sum"), id="C1000-fp16-1d-all-sum"),
]


@pytest.mark.parametrize("shape,dtype,spec", KDIM)
def test_kdim_and_1d(device, shape, dtype, spec):
    run_spec(device, shape, dtype, spec)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_1d_ignored_target(device, reduction):
    x, y, _, ours = run_spec(device, (1000,), BF16, dict(ignore_frac=1.0, reduction=reduction))
    assert y.dim() == 0 and ours.loss.dim() == 0
    assert torch.isnan(ours.loss) if reduction == "mean" else ours.loss == 0


# --- memory layouts ----------------------------------------------------------------------------------
LAYOUTS = [
    case((16, 1000), BF16, dict(IGN, layout="slice"), id="N16-C1000-bf16-colslice"),
    case((8, 50257), BF16, dict(layout="slice", label_smoothing=0.1), id="N8-C50257-bf16-colslice-smooth"),
    case((16, 1000), F32, dict(IGN, layout="transposed", weight=True), id="N16-C1000-fp32-transposed-weight"),
    case((16, 1000), F16, dict(layout="transposed", inplace_backward=True, use_lse=True),
                 id="N16-C1000-fp16-transposed-inplace-lse"),
    case((4, 300, 6), BF16, dict(IGN, layout="channels_last", reduction="none"),
         id="N4-C300-d6-bf16-classlast"),
    case((3, 300, 3, 4), F32, dict(ALL, layout="channels_last"), id="N3-C300-3x4-fp32-classlast-all"),
    case((3, 300, 2, 4), BF16, dict(IGN, layout="strided", label_smoothing=0.1),
         id="N3-C300-2x4-bf16-strided"),
    case((4, 300, 6), F16, dict(layout="slice", soft=True), id="N4-C300-d6-fp16-classslice-soft"),
    case((1000,), BF16, dict(layout="strided", label_smoothing=0.1), id="C1000-bf16-1d-strided"),
]


@pytest.mark.parametrize("shape,dtype,spec", LAYOUTS)
def test_noncontiguous(device, shape, dtype, spec):
    x, _, _, _ = run_spec(device, shape, dtype, spec)
    assert not x.is_contiguous()


def test_strided_class_ids(device):
    """A strided 1-D class-id target (every other element of a longer one)."""
    x = logits((16, 1000), BF16, device)
    y = class_ids(logits((32, 1000), BF16, device), ignore_frac=0.25)[::2]
    assert not y.is_contiguous()
    check(x, y, label_smoothing=0.1)


def test_transposed_probabilities(device):
    """A probability target whose class stride is not 1."""
    x = logits((16, 1000), BF16, device)
    p = torch.softmax(torch.randn(1000, 16, device=device) * 2, dim=0).to(BF16).t()
    assert not p.is_contiguous()
    check(x, p, reduction="sum")


# --- extreme values -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,spec", [
    pytest.param(F32, dict(IGN, label_smoothing=0.1), id="N16-C1000-fp32-smooth"),
    pytest.param(BF16, dict(IGN, weight=True, use_lse=True, reduction="none"),
                 id="N16-C1000-bf16-weight-lse-none"),
    pytest.param(F16, dict(IGN, reduction="sum"), id="N16-C1000-fp16-sum"),
    pytest.param(BF16, dict(lse_square_scale=1e-4, softcap=3e4, soft=True),
                 id="N16-C1000-bf16-soft-zloss-softcap"),
])
def test_huge_logits(device, dtype, spec):
    """|logits| ~ 1e4: lse - z_y must not lose the O(1) part to the O(1e4) magnitudes."""
    run_spec(device, (16, 1000), dtype, dict(spec, scale=1e4))


@pytest.mark.parametrize("dtype,spec", [
    pytest.param(F32, dict(weight=True, use_lse=True), id="N16-C1000-fp32-weight-lse-used"),
    pytest.param(BF16, dict(IGN, lse_square_scale=1e-2, reduction="none"),
                 id="N16-C1000-bf16-ignore-zloss-none"),
    pytest.param(F16, dict(logit_scale=0.5, reduction="sum", inplace_backward=True),
                 id="N16-C1000-fp16-scale0.5-inplace"),
    pytest.param(BF16, dict(softcap=5.0), id="N16-C1000-bf16-softcap5"),
])
def test_neg_inf_columns(device, dtype, spec):
    """Columns of -inf (never a target): finite loss, exactly zero gradient there."""
    spec = dict(spec)
    x = logits((16, 1000), dtype, device)
    dead = torch.tensor([0, 1, 2, 417, 998, 999])
    x[:, dead] = float("-inf")
    x[3, 100:900] = float("-inf")  # a row that is almost all -inf
    y = class_ids(x, ignore_frac=spec.pop("ignore_frac", 0.0),
                  avoid=tuple(dead.tolist()) + tuple(range(100, 900)))
    w = class_weight(1000, dtype, device) if spec.pop("weight", False) else None
    ours = check(x, y, w, **spec)
    assert torch.isfinite(ours.loss).all()
    assert torch.all(ours.grad[:, dead] == 0)


@pytest.mark.parametrize("dtype,spec", [
    pytest.param(F32, dict(reduction="none"), id="N16-C1000-fp32-none"),
    pytest.param(BF16, dict(label_smoothing=0.1, reduction="none"), id="N16-C1000-bf16-smooth-none"),
    pytest.param(F16, dict(lse_square_scale=1e-2, use_lse=True), id="N16-C1000-fp16-zloss-lse-used"),
])
def test_confident_rows(device, dtype, spec):
    """Rows whose target logit is 30 above the rest (softmax -> 1), mixed with ordinary rows."""
    x = logits((16, 1000), dtype, device)
    y = class_ids(x)
    rows = torch.arange(0, 16, 2)
    x[rows, y[rows]] = (x[rows].float().amax(1) + 30).to(dtype)
    check(x, y, **spec)


# --- launch policy: split backward and multi-block rows ------------------------------------------------
@pytest.mark.parametrize("shape,dtype,splits,spec", [
    pytest.param((4, 50257), BF16, 4, dict(IGN, label_smoothing=0.1), id="N4-C50257-bf16-4spans"),
    pytest.param((4, 262144), F32, 6, dict(weight=True, use_lse=True, reduction="none"),
                 id="N4-C262144-fp32-6spans-ragged"),
    pytest.param((4, 40000), F16, 3, dict(soft=True, label_smoothing=0.1, inplace_backward=True),
                 id="N4-C40000-fp16-soft-inplace"),
    pytest.param((2, 40000, 2), BF16, 3, dict(IGN, reduction="none"), id="N2-C40000-d2-bf16-none"),
])
def test_backward_split(device, shape, dtype, splits, spec):
    """Forcing the backward grid to split rows into column spans (a launch parameter, on every
    device) gives the same bits as one program per row."""
    R, C = shape[0] * (shape[2] if len(shape) > 2 else 1), shape[1]
    with launch.overrides(backward_splits=splits, block_c=4096):
        (rows, got), span = launch.backward_grid(R, C, launch.config(C).block_c)
        assert got > 1 and rows == R and span % 4096 == 0
        x, y, w, split = run_spec(device, shape, dtype, spec)
    with launch.overrides(backward_splits=1, block_c=4096):
        assert launch.backward_grid(R, C, 4096)[0][1] == 1
        lib = {k: v for k, v in spec.items() if k not in ("weight", "soft", "ignore_frac")}
        unsplit = check(x, y, w, **lib)
    assert torch.equal(unsplit.loss, split.loss)
    assert torch.equal(unsplit.grad, split.grad)


@pytest.mark.parametrize("spec", [
    pytest.param(dict(IGN, weight=True, label_smoothing=0.1, reduction="none"),
                 id="N16-C1000-block128-weight-smooth"),
    pytest.param(dict(soft=True, weight=True, label_smoothing=0.1, lse_square_scale=1e-2),
                 id="N16-C1000-block128-soft-weight-smooth"),
    pytest.param(dict(softcap=4.0, scale=4.0, use_lse=True), id="N16-C1000-block128-softcap-lse-used"),
])
def test_many_blocks_per_row(device, spec):
    """A forced block of 128 makes C=1000 eight ragged blocks: the online rescaling path."""
    with launch.overrides(block_c=128):
        assert launch.config(1000).block_c == 128
        run_spec(device, (16, 1000), F32, spec)


def test_first_block_all_neg_inf(device):
    """Rows whose first blocks are all -inf (running max -inf, reference 0) then finite."""
    x = logits((8, 1000), BF16, device)
    x[:, :300] = float("-inf")
    y = class_ids(x, avoid=tuple(range(300)))
    with launch.overrides(block_c=128):
        ours = check(x, y, lse_square_scale=1e-2, use_lse=True, reduction="none")
    assert torch.all(ours.grad[:, :300] == 0)


# --- the checks themselves can fail -------------------------------------------------------------------
def test_poison_is_active_and_caught(device):
    """Outputs start as NaN under the tests, and the rule rejects a single NaN or a wrong value."""
    assert runtime.poison_outputs()
    assert torch.isnan(runtime.alloc((3,), torch.float32, device)).all()
    ref = torch.randn(64, 100, dtype=torch.float64)
    bad = ref.clone()
    bad[5, 7] = float("nan")
    with pytest.raises(AssertionError):
        assert_close_rule("grad", bad, None, ref, BF16)
    bad[5, 7] = ref[5, 7] + 0.05 * ref.abs().max()
    with pytest.raises(AssertionError):
        assert_close_rule("grad", bad, None, ref, BF16)


# --- regressions: strides were once passed in (n, c, d) order, and strided targets read as contiguous --
@pytest.mark.parametrize("shape,layout", [((4, 300, 5), "contiguous"), ((4, 300), "transposed")],
                         ids=["kdim", "transposed"])
def test_regression_kdim_and_transposed_strides(device, shape, layout):
    x = logits(shape, F32, device, layout=layout)  # both read in bounds under the bug
    y = class_ids(x)
    torch.testing.assert_close(xent_triton.cross_entropy(x, y, reduction="none"),
                               F.cross_entropy(x, y, reduction="none"))


def test_regression_strided_target(device):
    x = logits((4, 300), F32, device)
    y = class_ids(logits((8, 300), F32, device))[::2]
    torch.testing.assert_close(xent_triton.cross_entropy(x, y, reduction="none"),
                               F.cross_entropy(x, y, reduction="none"))
