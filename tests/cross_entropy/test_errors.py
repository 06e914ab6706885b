"""Bad input raises a clear Python error (type + message), and out-of-range class ids on the kernel
path (what CUDA users get: no host sync) poison only their own row with NaN, without any
out-of-bounds memory access."""
import math
import os

import pytest
import torch

import xent_triton
from xent_triton.core.options import LossOptions
from xent_triton.core.runtime import uses_triton
from xent_triton.cross_entropy import ops

N, C = 6, 40


def _x(dtype=torch.float32, shape=(N, C)) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype)


def _y(n=N, dtype=torch.int64, c=C) -> torch.Tensor:
    return torch.randint(0, c, (n,), dtype=dtype)


def _with(t: torch.Tensor, row: int, value: int) -> torch.Tensor:
    t = t.clone()
    t[row] = value
    return t


# Each case: a thunk building (args, kwargs) for xent_triton.cross_entropy, the exception type and a
# fragment of its message. Thunks keep the random inputs out of collection time.
ERROR_CASES = [
    # target out of [0, C) and not ignore_index (CPU check, like torch's IndexError)
    pytest.param(lambda: ((_x(), _with(_y(), 2, C)), {}), IndexError, f"Target {C} is out of bounds",
                 id="target-eq-C"),
    pytest.param(lambda: ((_x(), _with(_y(), 0, 10 * C)), {}), IndexError, "out of bounds", id="target-gt-C"),
    pytest.param(lambda: ((_x(), _with(_y(), 4, -1)), {}), IndexError, "Target -1 is out of bounds",
                 id="target-neg1"),
    pytest.param(lambda: ((_x(), _with(_y(), 1, -100)), {"ignore_index": 3}), IndexError,
                 "Target -100 is out of bounds", id="target-neg100-other-ignore-index"),
    pytest.param(lambda: ((_x(), _with(_y(dtype=torch.int32), 5, C + 1)), {}), IndexError, "out of bounds",
                 id="target-int32-gt-C"),
    pytest.param(lambda: ((_x(shape=(2, C, 3)), _with(_y(6).view(2, 3), 1, -5)), {}), IndexError,
                 "Target -5 is out of bounds", id="target-kdim-neg5"),
    # probability targets
    pytest.param(lambda: ((_x(), torch.rand(N, C + 1)), {}), ValueError, "must have the input's shape",
                 id="soft-target-wrong-shape"),
    # dtypes
    pytest.param(lambda: ((torch.randint(0, 9, (N, C)), _y()), {}), TypeError, "input must be float16",
                 id="int64-logits"),
    pytest.param(lambda: ((torch.randint(0, 9, (N, C), dtype=torch.int32), _y()), {}), TypeError,
                 "input must be float16", id="int32-logits"),
    pytest.param(lambda: ((_x(), _y(dtype=torch.int16)), {}), TypeError, "target must be int64/int32",
                 id="int16-target"),
    pytest.param(lambda: ((_x(), _y().bool()), {}), TypeError, "target must be int64/int32",
                 id="bool-target"),
    pytest.param(lambda: (([[0.0] * C] * N, _y()), {}), TypeError, "must be tensors", id="list-input"),
    # devices ('meta' stands in for a second device)
    pytest.param(lambda: ((_x(), _y().to("meta")), {}), ValueError, "target is on meta but input is on cpu",
                 id="target-on-other-device"),
    pytest.param(lambda: ((_x(), torch.rand(N, C, device="meta")), {}), ValueError, "target is on meta",
                 id="soft-target-on-other-device"),
    pytest.param(lambda: ((_x(), _y()), {"weight": torch.rand(C, device="meta")}), ValueError,
                 "weight is on meta but input is on cpu", id="weight-on-other-device"),
    # class weights
    pytest.param(lambda: ((_x(), _y()), {"weight": torch.rand(C - 1)}), ValueError,
                 f"weight must have shape ({C},)", id="weight-too-short"),
    pytest.param(lambda: ((_x(), _y()), {"weight": torch.rand(C + 1)}), ValueError,
                 f"weight must have shape ({C},)", id="weight-too-long"),
    pytest.param(lambda: ((_x(), _y()), {"weight": torch.rand(1, C)}), ValueError, "weight must have shape",
                 id="weight-2d"),
    pytest.param(lambda: ((_x(), _y()), {"weight": torch.ones(C, dtype=torch.int64)}), TypeError,
                 "weight must be a floating-point tensor", id="weight-int64"),
    pytest.param(lambda: ((_x(), _y()), {"weight": torch.rand(C, requires_grad=True)}), NotImplementedError,
                 "gradient with respect to weight", id="weight-requires-grad"),
    # scalar options
    pytest.param(lambda: ((_x(), _y()), {"label_smoothing": -0.1}), ValueError,
                 "label_smoothing must be in [0, 1]", id="smoothing-neg"),
    pytest.param(lambda: ((_x(), _y()), {"label_smoothing": 1.5}), ValueError,
                 "label_smoothing must be in [0, 1]", id="smoothing-gt1"),
    pytest.param(lambda: ((_x(), _y()), {"label_smoothing": math.nan}), ValueError, "label_smoothing must be",
                 id="smoothing-nan"),
    pytest.param(lambda: ((_x(), _y()), {"softcap": 0.0}), ValueError, "softcap must be a positive finite",
                 id="softcap-0"),
    pytest.param(lambda: ((_x(), _y()), {"softcap": -30.0}), ValueError, "softcap must be a positive finite",
                 id="softcap-neg"),
    pytest.param(lambda: ((_x(), _y()), {"softcap": math.nan}), ValueError,
                 "softcap must be a positive finite", id="softcap-nan"),
    pytest.param(lambda: ((_x(), _y()), {"softcap": math.inf}), ValueError,
                 "softcap must be a positive finite", id="softcap-inf"),
    pytest.param(lambda: ((_x(), _y()), {"lse_square_scale": math.nan}), ValueError,
                 "lse_square_scale must be a finite", id="zloss-nan"),
    pytest.param(lambda: ((_x(), _y()), {"logit_scale": math.inf}), ValueError,
                 "logit_scale must be a finite", id="logit-scale-inf"),
    pytest.param(lambda: ((_x(), _y()), {"logit_scale": torch.tensor(2.0)}), ValueError,
                 "logit_scale must be a finite Python float", id="logit-scale-tensor"),
    pytest.param(lambda: ((_x(), _y()), {"reduction": "avg"}), ValueError, "reduction must be one of",
                 id="reduction-unknown"),
    pytest.param(lambda: ((_x(), _y()), {"reduction": None}), ValueError, "reduction must be one of",
                 id="reduction-none-object"),
    # shapes
    pytest.param(lambda: ((torch.tensor(1.5), torch.tensor(0)), {}), ValueError, "got a scalar",
                 id="0d-input"),
    pytest.param(lambda: ((torch.randn(N, 0), torch.zeros(N, dtype=torch.int64)), {}), ValueError,
                 "no classes", id="zero-classes"),
    pytest.param(lambda: ((_x(), _y(N + 1)), {}), ValueError, f"must have shape ({N},)",
                 id="2d-target-too-long"),
    pytest.param(lambda: ((_x(), _y().view(N, 1)), {}), ValueError, f"must have shape ({N},)",
                 id="2d-target-2d"),
    pytest.param(lambda: ((_x(shape=(C,)), _y(1)), {}), ValueError, "must have shape ()",
                 id="1d-input-1elem-target"),
    pytest.param(lambda: ((_x(shape=(2, C, 3, 4)), _y(6).view(2, 3)), {}), ValueError,
                 "must have shape (2, 3, 4)", id="4d-input-target-missing-dim"),
    pytest.param(lambda: ((_x(shape=(2, C, 3)), _y(6).view(3, 2)), {}), ValueError, "must have shape (2, 3)",
                 id="3d-input-target-transposed"),
    pytest.param(lambda: ((_x(shape=(2, C, 3)), _y(2)), {}), ValueError, "must have shape (2, 3)",
                 id="3d-input-1d-target"),
    # a layout option without the group it belongs to is refused, not ignored
    pytest.param(lambda: ((_x(), _y()), {"vocab_start_index": 0}), ValueError, "needs a process_group",
                 id="vocab_start_index-without-group"),
]


@pytest.mark.parametrize("make, exc, fragment", ERROR_CASES)
def test_functional_rejects_bad_input(make, exc, fragment):
    """xent_triton.cross_entropy raises ``exc`` whose message contains ``fragment``."""
    args, kwargs = make()
    with pytest.raises(exc) as info:
        xent_triton.cross_entropy(*args, **kwargs)
    assert fragment in str(info.value), f"message {str(info.value)!r} lacks {fragment!r}"


MODULE_CASES = [
    pytest.param({"reduction": "batchmean"}, ValueError, "reduction must be one of", id="reduction"),
    pytest.param({"label_smoothing": 1.01}, ValueError, "label_smoothing must be in [0, 1]",
                 id="smoothing-gt1"),
    pytest.param({"label_smoothing": -1e-3}, ValueError, "label_smoothing must be in [0, 1]",
                 id="smoothing-neg"),
    pytest.param({"softcap": 0.0}, ValueError, "softcap must be", id="softcap-0"),
    pytest.param({"softcap": math.inf}, ValueError, "softcap must be", id="softcap-inf"),
    pytest.param({"lse_square_scale": math.inf}, ValueError, "lse_square_scale must be", id="zloss-inf"),
    pytest.param({"logit_scale": math.nan}, ValueError, "logit_scale must be", id="logit-scale-nan"),
]


@pytest.mark.parametrize("options, exc, fragment", MODULE_CASES)
def test_module_rejects_bad_options_at_construction(options, exc, fragment):
    """CrossEntropyLoss validates its options in __init__, before any input is seen."""
    with pytest.raises(exc) as info:
        xent_triton.CrossEntropyLoss(**options)
    assert fragment in str(info.value), f"message {str(info.value)!r} lacks {fragment!r}"


def test_module_rejects_bad_input_at_call():
    """A valid module still validates the input it is called with (out-of-range class id on CPU)."""
    crit = xent_triton.CrossEntropyLoss(label_smoothing=0.1)
    with pytest.raises(IndexError, match="out of bounds"):
        crit(_x(), _with(_y(), 3, C + 7))


BAD_ROW_CASES = [
    # (bad target values by row, kernel options) on an (N, C, 1) view; row N-1 is ignored (-100)
    pytest.param({1: C, 4: -3}, {}, id="plain"),
    pytest.param({0: 2**40, 3: -7}, {"weight": True}, id="weight"),
    pytest.param({2: C + 100}, {"weight": True, "label_smoothing": 0.2, "softcap": 20.0},
                 id="weight-smooth-softcap"),
    pytest.param({3: -1, 1: C}, {"label_smoothing": 0.1, "lse_square_scale": 1e-3}, id="smooth-zloss"),
]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1", reason="needs the interpreter (traffic)")
@pytest.mark.parametrize("bad, options", BAD_ROW_CASES)
def test_kernel_out_of_range_target_gives_nan_row_without_oob(bad, options):
    """The kernel path (no host check, as on CUDA) turns an out-of-range class id into a NaN loss
    and NaN row weight for that row only, a NaN gradient row only there, and never reads or writes
    outside its tensors (traffic's oob list stays empty). Ignored rows stay finite (zero)."""
    from harness import traffic

    x = torch.randn(N, C, 1, dtype=torch.bfloat16)
    assert uses_triton(x), "this test exercises the Triton kernels (interpreter or CUDA)"
    y = _y()
    y[N - 1] = -100  # an ignored row next to the bad ones
    for row, v in bad.items():
        y[row] = v
    w = torch.rand(C) + 0.5 if options.get("weight") else None
    opts = LossOptions.make(label_smoothing=options.get("label_smoothing", 0.0),
                            lse_square_scale=options.get("lse_square_scale", 0.0),
                            softcap=options.get("softcap"))
    bad_rows = torch.zeros(N, dtype=torch.bool)
    bad_rows[list(bad)] = True
    with traffic.count() as r:
        loss, lse, stats, _, _ = ops.forward_rows(x, y, w, opts)
        dloss = torch.rand(N) + 0.1
        dx = torch.full_like(x, 7.0)
        ops.backward_into(dx, x, y, w, stats, dloss, None, opts)
    assert r["oob"] == [], f"out-of-bounds lanes: {r['oob']}"
    assert r["launches"] == 2
    assert torch.isnan(loss[bad_rows]).all() and torch.isfinite(loss[~bad_rows]).all(), loss
    assert torch.isnan(stats[bad_rows, 2]).all() and torch.isfinite(stats[~bad_rows, 2]).all(), stats
    assert torch.isfinite(lse).all(), "the lse does not depend on the target"
    assert loss[N - 1] == 0 and stats[N - 1, 2] == 0, "ignored row"
    assert torch.isnan(loss.sum() / stats[:, 2].sum()), "a mean over a bad row is NaN"
    g = dx.squeeze(-1)
    assert torch.isnan(g[bad_rows]).all(), "every element of a bad row's gradient is NaN"
    assert torch.isfinite(g[~bad_rows]).all(), "other rows' gradients stay finite"
    assert (g[N - 1] == 0).all(), "an ignored row's gradient is zero"
