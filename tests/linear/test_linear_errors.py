"""Bad input to linear_cross_entropy raises a clear error before any kernel runs; out-of-range class
ids on the kernel path (what CUDA users get: no host sync) give NaN without out-of-bounds access."""
import math

import pytest
import torch

import xent_triton
from xent_triton.core.options import LossOptions
from xent_triton.linear import ops as linear_ops

N, D, C = 6, 32, 40


def _args(dtype=torch.float32, **over):
    a = dict(input=torch.randn(N, D, dtype=dtype), linear_weight=torch.randn(C, D, dtype=dtype),
             target=torch.randint(0, C, (N,)))
    a.update(over)
    return a


def _with(t, i, v):
    t = t.clone()
    t.view(-1)[i] = v
    return t


ERROR_CASES = [  # (thunk -> (kwargs for linear_cross_entropy), exception, message fragment)
    pytest.param(lambda: _args(linear_weight=torch.randn(C, D + 1)), ValueError,
                 "must equal linear_weight's in_features", id="D-mismatch"),
    pytest.param(lambda: _args(linear_weight=torch.randn(C * D)), ValueError, "must have shape (C, D)",
                 id="weight-1d"),
    pytest.param(lambda: _args(linear_bias=torch.randn(C + 1)), ValueError, f"must have shape ({C},)",
                 id="bias-wrong-length"),
    pytest.param(lambda: _args(linear_bias=torch.randn(C, 1)), ValueError, "linear_bias must have shape",
                 id="bias-2d"),
    pytest.param(lambda: _args(linear_weight=torch.randn(C, D, dtype=torch.bfloat16)), TypeError,
                 "must match input dtype", id="weight-dtype-mismatch"),
    pytest.param(lambda: _args(linear_bias=torch.randn(C, dtype=torch.float16)), TypeError,
                 "linear_bias dtype", id="bias-dtype-mismatch"),
    pytest.param(lambda: _args(input=torch.randint(0, 3, (N, D))), TypeError, "input must be float16",
                 id="int-input"),
    pytest.param(lambda: _args(input=torch.tensor(1.0)), ValueError, "got a scalar", id="scalar-input"),
    pytest.param(lambda: _args(linear_weight=torch.randn(0, D)), ValueError, "no classes", id="C-zero"),
    pytest.param(lambda: _args(vocab_start_index=8), ValueError, "needs a process_group",
                 id="vocab_start_index-without-group"),
    pytest.param(lambda: _args(target=_with(torch.randint(0, C, (N,)), 2, C)), IndexError,
                 f"Target {C} is out of bounds", id="target-eq-C"),
    pytest.param(lambda: _args(target=_with(torch.randint(0, C, (N,)), 0, -1)), IndexError,
                 "Target -1 is out of bounds", id="target-neg1"),
    pytest.param(lambda: _args(target=_with(torch.randint(0, C, (N,), dtype=torch.int32), 5, 10 * C)),
                 IndexError, "out of bounds", id="target-int32-gt-C"),
    pytest.param(lambda: _args(target=torch.randint(0, C, (N + 1,))), ValueError,
                 "for input's leading shape", id="target-wrong-shape"),
    pytest.param(lambda: _args(target=torch.rand(N, C)), TypeError, "probability targets are not supported",
                 id="soft-target"),
    pytest.param(lambda: _args(target=torch.randint(0, C, (N,), dtype=torch.int16)), TypeError,
                 "int64/int32", id="int16-target"),
    pytest.param(lambda: _args(weight=torch.rand(C + 2)), ValueError, "one per class",
                 id="class-weight-length"),
    pytest.param(lambda: _args(weight=torch.rand(C, requires_grad=True)), NotImplementedError,
                 "gradient with respect to weight", id="class-weight-requires-grad"),
    pytest.param(lambda: _args(reduction="avg"), ValueError, "reduction must be one of", id="reduction"),
    pytest.param(lambda: _args(label_smoothing=1.5), ValueError, "label_smoothing must be in [0, 1]",
                 id="smoothing-gt-1"),
    pytest.param(lambda: _args(softcap=0.0), ValueError, "softcap must be a positive", id="softcap-0"),
    pytest.param(lambda: _args(logit_scale=math.inf), ValueError, "logit_scale must be a finite",
                 id="logit-scale-inf"),
    pytest.param(lambda: _args(linear_weight="W"), TypeError, "linear_weight must be a tensor",
                 id="weight-not-tensor"),
]


@pytest.mark.parametrize("make,exc,msg", ERROR_CASES)
def test_bad_input_raises(make, exc, msg):
    kwargs = make()
    with pytest.raises(exc) as info:
        xent_triton.linear_cross_entropy(**kwargs)
    assert msg in str(info.value), str(info.value)


def test_module_validates_options_at_construction():
    with pytest.raises(ValueError, match="reduction"):
        xent_triton.LinearCrossEntropyLoss(reduction="batchmean")


@pytest.mark.parametrize("bad", [pytest.param(C, id="eq-C"), pytest.param(-3, id="neg3"),
                                 pytest.param(2**40, id="huge")])
def test_out_of_range_target_on_the_kernel_path_is_nan_only_where_it_must(bad):
    """Without the CPU check (the CUDA path: no host sync) an out-of-range id makes its own row's
    loss NaN (others exact), and every gradient NaN (each class's gradient sums over all rows);
    no lane touches memory outside the tensors (checked by conftest's traffic fixture)."""
    x, w, b = torch.randn(N, D), torch.randn(C, D), torch.randn(C)
    y = _with(torch.randint(0, C, (N,)), 3, bad)
    opts = LossOptions(label_smoothing=0.1)
    loss, lse, stats = linear_ops.linear_forward_rows(x, w, b, y, None, opts, True)
    assert torch.isnan(loss[3]) and torch.isfinite(torch.cat([loss[:3], loss[4:]])).all()
    assert torch.isfinite(lse).all()
    dx, dw, db = linear_ops.linear_backward_rows(x, w, b, y, None, stats, torch.full((N,), 0.5), None, opts,
                                          (True, True, True))
    assert torch.isnan(dx[3]).all() and torch.isnan(dw).all() and torch.isnan(db).all()
