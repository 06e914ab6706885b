"""Fused linear cross-entropy vs float64 PyTorch (F.linear + cross_entropy_composed), with PyTorch's
own error in the test dtype as the yardstick (tests/harness/tolerances.py), for the loss, the lse and the
gradients of input, linear_weight and linear_bias.

Interpreter tiles (config.INTERPRET_LINEAR): 64 rows x min(4096, 2**ceil(log2 C)) classes x 64 hidden,
2 class splits in forward; so D = 123 / 256 loop over 2 / 4 hidden chunks, N = 130 / 1000 over 3 / 16
row blocks, C = 4097 / 50257 over 2 / 13 class tiles (the last one 1 / 1105 classes wide).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from reference import cross_entropy_composed
from tolerances import assert_close_rule, rel_err
from xent_triton.core.options import LossOptions
from xent_triton.core.partials import combine
from xent_triton.linear import chunk_grads, chunk_torch, cpu_gemm
from xent_triton.linear import chunked as linear_chunked
from xent_triton.linear import ops as linear_ops

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
ALL = dict(weight=True, label_smoothing=0.1, lse_square_scale=1e-3, softcap=4.0, logit_scale=1.3,
           return_lse=True)


def make_inputs(lead, D, C, dtype, *, bias=True, ignore="some", ignore_index=-100, w_scale=3.0,
                device="cpu"):
    """x (*lead, D), W (C, D), b (C,) in ``dtype`` (logits of a few units), class ids with
    ``ignore``: none | some (~25 %, first row ignored) | all | block (rows 0..63 ignored)."""
    x = torch.randn(*lead, D, device=device).to(dtype)
    w = (torch.randn(C, D, device=device) * (w_scale / math.sqrt(D))).to(dtype)
    b = (torch.randn(C, device=device) * 0.5).to(dtype) if bias else None
    y = torch.randint(0, C, lead, device=device)
    flat = y.view(-1)
    if ignore == "some":
        flat[torch.rand(flat.shape, device=device) < 0.25] = ignore_index
        flat[0] = ignore_index
    elif ignore == "all":
        flat[:] = ignore_index
    elif ignore == "block":
        flat[:64] = ignore_index
        flat[100::3] = ignore_index
    return x, w, b, y


def _upstream(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).float()


def evaluate(fn, x, w, b, y, dtype, need, reduction, return_lse, **kw):
    """fn(x, w, b, y) in ``dtype`` leaves -> (loss, lse, [grads of the tensors in need])."""
    leaves = [t.detach().to(dtype).requires_grad_(n) if t is not None else None
              for t, n in zip((x, w, b), need)]
    out = fn(*leaves, y, reduction=reduction, return_lse=return_lse, **kw)
    loss, lse = out if return_lse else (out, None)
    low = dtype if dtype != F64 else F32
    g = _upstream(loss.shape, low, 1) if reduction == "none" else torch.tensor(0.37).to(low).float()
    tensors, grads = [loss], [g.to(loss.dtype)]
    if lse is not None:
        tensors.append(lse)
        grads.append(_upstream(lse.shape, low, 2).to(lse.dtype))
    if any(t is not None and t.requires_grad for t in leaves):
        torch.autograd.backward(tensors, grads)
    return loss.detach(), lse, [t.grad if t is not None and t.requires_grad else None for t in leaves]


def ours(x, w, b, y, **kw):
    return xent_triton.linear_cross_entropy(x, w, y, linear_bias=b, **kw)


def composed(x, w, b, y, weight=None, reduction="mean", return_lse=False, chunk_size=None,
             grad_accum_dtype=None, **kw):
    """The truth: F.linear, then cross_entropy_composed on (tokens, C) logits."""
    cw = weight.to(x.dtype) if weight is not None else None
    z = F.linear(x, w, b).reshape(-1, w.shape[0])
    loss, lse = cross_entropy_composed(z, y.reshape(-1), cw, reduction=reduction, return_lse=True, **kw)
    loss = loss.view(y.shape) if reduction == "none" else loss
    return (loss, lse.view(y.shape)) if return_lse else loss


def check(lead, D, C, dtype, *, bias=True, ignore="some", reduction="mean", need=(True, True, True),
          weight=False, w_scale=3.0, **opts):
    """Ours vs float64 truth, torch in ``dtype`` as yardstick; returns {name: (ours, torch) error}."""
    x, w, b, y = make_inputs(lead, D, C, dtype, bias=bias, ignore=ignore, w_scale=w_scale,
                             ignore_index=opts.get("ignore_index", -100))
    if weight:
        opts["weight"] = (torch.rand(C) * 1.5 + 0.25).to(dtype).float()
    return_lse = opts.pop("return_lse", False)
    need = tuple(n and t is not None for n, t in zip(need, (x, w, b)))
    mine = evaluate(ours, x, w, b, y, dtype, need, reduction, return_lse, **opts)
    ref = evaluate(composed, x, w, b, y, F64, need, reduction, return_lse, **opts)
    theirs = evaluate(composed, x, w, b, y, dtype, need, reduction, return_lse, **opts)
    out_dtype = F64 if dtype == F64 else F32
    assert mine[0].dtype == out_dtype and mine[0].shape == ref[0].shape
    names = ["loss", "lse", "d_input", "d_weight", "d_bias"]
    errors = {}
    for name, a, t, r in zip(names, [mine[0], mine[1], *mine[2]], [theirs[0], theirs[1], *theirs[2]],
                             [ref[0], ref[1], *ref[2]]):
        if r is None:
            continue
        if name.startswith("d_"):
            assert a is not None and a.dtype == dtype, f"{name}: dtype {a.dtype if a is not None else None}"
        if name == "lse":
            assert a.dtype == out_dtype and a.shape == y.shape
        e_t = rel_err(t, r) if t is not None else float("inf")
        usable = t is not None and math.isfinite(e_t) and e_t <= 0.05 and t.shape == r.shape
        errors[name] = assert_close_rule(name, a, t if usable else None, r, dtype)
    for name, g in zip(names[2:], mine[2]):
        if g is not None and not need[names[2:].index(name)]:
            pytest.fail(f"{name} computed although not required")
    return errors


CASES = [  # (id, lead, D, C, dtype, kwargs)
    *[pytest.param((50,), D, 1000, dt, {}, id=f"N50-D{D}-C1000-{n}")
      for dt, n in ((F32, "fp32"), (BF16, "bf16"), (F16, "fp16")) for D in (64, 123, 256)],
    pytest.param((37,), 64, 50257, BF16, dict(ALL), id="N37-D64-C50257-bf16-all-options"),
    pytest.param((37,), 123, 50257, F32, dict(reduction="sum"), id="N37-D123-C50257-fp32-sum"),
    pytest.param((1000,), 64, 1000, BF16, dict(reduction="none"), id="N1000-D64-C1000-bf16-none"),
    pytest.param((130,), 123, 4097, F16, dict(reduction="none", ignore="block"),
                 id="N130-D123-C4097-fp16-block-ignored"),
    pytest.param((2, 13), 64, 1000, BF16, dict(reduction="none", return_lse=True),
                 id="3d-2x13-D64-bf16-none-lse"),
    pytest.param((3, 5), 123, 4097, F32, dict(ALL, reduction="sum"), id="3d-3x5-D123-C4097-fp32-all-sum"),
]


@pytest.mark.parametrize("lead,D,C,dtype,kw", CASES)
def test_shapes_and_dtypes(lead, D, C, dtype, kw):
    check(lead, D, C, dtype, **kw)


OPTIONS = [
    pytest.param(dict(weight=True), id="weight"),
    pytest.param(dict(label_smoothing=0.1), id="smooth0.1"),
    pytest.param(dict(lse_square_scale=1e-3), id="zloss1e-3"),
    pytest.param(dict(softcap=3.0), id="softcap3"),
    pytest.param(dict(logit_scale=0.7), id="scale0.7"),
    pytest.param(dict(return_lse=True), id="return-lse"),
    pytest.param(dict(ignore_index=5), id="ignore-index-5-a-class"),
    pytest.param(dict(bias=False), id="no-bias"),
    pytest.param(dict(w_scale=60.0), id="large-logits"),
    pytest.param(dict(ALL, reduction="none"), id="all-none"),
    pytest.param(dict(ALL, reduction="sum", bias=False), id="all-sum-no-bias"),
    pytest.param(dict(ALL, label_smoothing=1.0), id="all-smooth1"),
]


@pytest.mark.parametrize("dtype", [pytest.param(BF16, id="bf16"), pytest.param(F32, id="fp32")])
@pytest.mark.parametrize("kw", OPTIONS)
def test_options(kw, dtype):
    check((48,), 64, 1000, dtype, **dict(kw))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore,extra", [
    pytest.param("all", {}, id="all-ignored"),
    pytest.param("all", dict(return_lse=True, lse_square_scale=1e-2), id="all-ignored-lse"),
    pytest.param("none", dict(label_smoothing=0.2), id="none-ignored"),
    pytest.param("block", dict(weight=True), id="first-block-ignored"),
    pytest.param("block", dict(return_lse=True), id="first-block-ignored-lse"),
])
def test_ignored_tokens(ignore, extra, reduction):
    """Ignored rows: zero loss and input gradient; all ignored: mean is NaN (as torch), gradients 0;
    a row block with every row ignored skips its work (forward too unless the lse is returned)."""
    check((130,), 64, 1000, F16, ignore=ignore, reduction=reduction, **extra)


@pytest.mark.parametrize("need", [
    pytest.param((True, False, False), id="input-only"), pytest.param((False, True, False), id="weight-only"),
    pytest.param((False, False, True), id="bias-only"), pytest.param((True, True, False), id="no-bias-grad"),
])
def test_gradient_subsets(need):
    check((50,), 64, 1000, BF16, need=need, label_smoothing=0.1)


def test_no_grad_forward_only():
    x, w, b, y = make_inputs((20,), 64, 300, BF16)
    loss = xent_triton.linear_cross_entropy(x, w, y, linear_bias=b)
    ref = composed(x.double(), w.double(), b.double(), y)
    assert_close_rule("loss", loss, None, ref, BF16)


def test_module_matches_functional():
    x, w, b, y = make_inputs((4, 6), 64, 500, BF16)
    crit = xent_triton.LinearCrossEntropyLoss(ignore_index=-100, reduction="sum", label_smoothing=0.1,
                                              lse_square_scale=1e-3, softcap=5.0, return_lse=True)
    loss, lse = crit(x, w, y, b)
    loss2, lse2 = xent_triton.linear_cross_entropy(x, w, y, linear_bias=b, reduction="sum",
                                                   label_smoothing=0.1, lse_square_scale=1e-3, softcap=5.0,
                                                   return_lse=True)
    assert torch.equal(loss, loss2) and torch.equal(lse, lse2) and lse.shape == (4, 6)
    assert "label_smoothing=0.1" in repr(crit)


@pytest.mark.parametrize("dtype", [pytest.param(F64, id="fp64"), pytest.param(F32, id="fp32-torch-path")])
def test_pure_torch_path(monkeypatch, dtype):
    """float64 (and any input where Triton cannot run) takes the chunked torch path; chunks and row
    blocks smaller than the shape so every loop iterates (the per-token forward's chunks too)."""
    monkeypatch.setattr(linear_chunked, "CPU_WORKSPACE_BYTES", 1)  # 16-row chunks (CPU_MIN_ROWS)
    monkeypatch.setattr(chunk_torch, "BLOCK_ELEMS", 3 * 300)  # 3-row blocks
    if dtype == F32:
        monkeypatch.setattr(linear_ops, "uses_triton", lambda x: False)
        monkeypatch.setattr(linear_chunked, "uses_triton", lambda x: False)
    check((40,), 32, 300, dtype, chunk_size=7, **dict(ALL, reduction="none"))
    check((40,), 32, 300, dtype, chunk_size=7, **dict(ALL, return_lse=False))


@pytest.mark.parametrize("dtype", [pytest.param(BF16, id="bf16"), pytest.param(F16, id="fp16")])
@pytest.mark.parametrize("kw", [pytest.param(dict(ALL, return_lse=False), id="chunked-all-options"),
                                pytest.param(dict(reduction="sum", weight=True), id="chunked-sum"),
                                pytest.param(dict(ALL, reduction="none"), id="recompute-all-options")])
@pytest.mark.parametrize("gemm", ["16bit", "fp32"])
def test_plain_cpu_path_16bit(monkeypatch, dtype, kw, gemm):
    """CPU tensors without Triton, 16-bit operands: 16-bit GEMMs (or fp32 GEMMs on upcast blocks,
    ``XENT_CPU_GEMM``), logits upcast by row blocks, dW accumulated in fp32 through a block-sized
    scratch (16-bit GEMMs); every block loop iterates (3 rows per row block, 16 classes per scratch
    block, 7-token chunks), against the float64 truth."""
    monkeypatch.setenv("XENT_CPU_GEMM", gemm)
    monkeypatch.setattr(cpu_gemm, "BLOCK_ELEMS", 64)  # several fp32 blocks per GEMM
    monkeypatch.setattr(linear_ops, "uses_triton", lambda x: False)
    monkeypatch.setattr(linear_chunked, "uses_triton", lambda x: False)
    monkeypatch.setattr(chunk_torch, "BLOCK_ELEMS", 3 * 300)
    monkeypatch.setattr(linear_chunked, "CPU_SCRATCH_ELEMS", 1)
    monkeypatch.setattr(chunk_grads, "CPU_SCRATCH_ELEMS", 1)  # its product blocks too
    monkeypatch.setattr(linear_ops, "CPU_SCRATCH_ELEMS", 16 * 32)
    monkeypatch.setattr(linear_chunked, "CPU_WORKSPACE_BYTES", 1)  # the per-token forward: 16-row chunks
    assert linear_chunked.logits_dtype(torch.empty(1, dtype=dtype)) == dtype
    check((40,), 32, 300, dtype, chunk_size=7, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_and_recompute_paths_agree(reduction):
    """The token-chunked path (scalar upstream gradient) and the recompute path (forced by asking
    for the lse without using it) give the same loss and gradients, for any chunk size."""
    x, w, b, y = make_inputs((45,), 64, 700, F32)
    kw = dict(linear_bias=None, label_smoothing=0.1, lse_square_scale=1e-3, softcap=6.0,
              reduction=reduction, weight=torch.rand(700) + 0.5)
    runs = []
    for chunk, lse in ((None, False), (7, False), (45, False), (8, True)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out = xent_triton.linear_cross_entropy(leaves[0], leaves[1], y, chunk_size=chunk, return_lse=lse,
                                               **dict(kw, linear_bias=leaves[2]))
        loss = out[0] if lse else out
        loss.backward(torch.tensor(0.7))
        runs.append((loss.detach(), [t.grad for t in leaves]))
    for loss, grads in runs[1:]:
        torch.testing.assert_close(loss, runs[0][0], rtol=2e-6, atol=1e-6)
        for a, c in zip(grads, runs[0][1]):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lse", [pytest.param(True, id="per-token-recompute"),
                                 pytest.param(False, id="token-chunked")])
def test_torch_compile_fullgraph(lse):
    """torch.compile (aot_eager: traces the fake impls and the registered autograd) with no graph
    break gives the eager results, on both algorithms."""
    x, w, b, y = make_inputs((40,), 64, 500, BF16)

    def step(x, w, b, y):
        out = xent_triton.linear_cross_entropy(x, w, y, linear_bias=b, label_smoothing=0.1,
                                               lse_square_scale=1e-3, return_lse=lse, chunk_size=16)
        return out[0] + 0.1 * out[1].sum() if lse else out * 1.5

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    runs = []
    for fn in (compiled, step):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out = fn(*leaves, y)
        out.backward()
        runs.append((out.detach(), [t.grad for t in leaves]))
    assert torch.equal(runs[0][0], runs[1][0])
    for a, c in zip(runs[0][1], runs[1][1]):
        assert_close_rule("grad", a, None, c.double(), BF16)


def test_custom_ops_opcheck():
    """Schema, fake (meta) implementations and autograd registration of the custom ops."""
    x, w, b, y = make_inputs((8,), 32, 100, F32)
    x.requires_grad_()
    w.requires_grad_()
    opts = LossOptions(label_smoothing=0.1)  # the options: keyword-only arguments of every op
    args = (x, w, b, y, None, True, 0)
    torch.library.opcheck(torch.ops.xent_triton.linear_cross_entropy_fwd.default, args, opts.flat(),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    _, _, stats = linear_ops.linear_forward_rows(x.detach(), w.detach(), b, y, None, opts, True)
    bargs = (x.detach(), w.detach(), b, y, None, stats, torch.rand(8), None, True, True, False, 0)
    torch.library.opcheck(torch.ops.xent_triton.linear_cross_entropy_bwd.default, bargs, opts.flat(),
                          test_utils=("test_schema", "test_faketensor"))
    copts = LossOptions(label_smoothing=0.1, softcap=3.0, lse_square_scale=1e-3)
    cargs = (x, w, b, y, None, None, 3, True, True, True, True, False)
    torch.library.opcheck(torch.ops.xent_triton.linear_cross_entropy_chunked.default, cargs, copts.flat(),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_vocabulary_shards_combine_to_the_full_result():
    """The tensor-parallel door: per-shard partials (class_offset) merged by ``combine`` give the
    full forward, and per-shard backward with the global stats gives the full gradients."""
    x, w, b, y = make_inputs((70,), 64, 3000, F32)
    cw = torch.rand(3000) + 0.5
    opts = LossOptions(label_smoothing=0.1, softcap=3.0)
    loss, lse, stats = linear_ops.linear_forward_rows(x, w, b, y, cw, opts, False)
    cuts = [0, 1300, 3000]  # shard 0 ends mid-tile
    parts = [linear_ops.forward_partials(x, w[c0:c1], b[c0:c1], y, cw[c0:c1], opts, False, class_offset=c0)
             for c0, c1 in zip(cuts, cuts[1:])]
    loss2, lse2, stats2 = combine(torch.cat(parts, 0), y, cw, 3000, opts)
    assert_close_rule("loss", loss2, None, loss.double(), F32)
    assert_close_rule("lse", lse2, None, lse.double(), F32)
    g = torch.rand(70)
    need = (True, True, True)
    full = linear_ops.backward_accumulate(x, w, b, y, cw, stats, g, None, opts, need)
    shards = [linear_ops.backward_accumulate(x, w[c0:c1], b[c0:c1], y, cw[c0:c1], stats2, g, None, opts, need,
                                             class_offset=c0, n_classes=3000, weight_total=cw.sum())
              for c0, c1 in zip(cuts, cuts[1:])]
    assert_close_rule("dX", sum(s[0] for s in shards), None, full[0].double(), F32)
    assert_close_rule("dW", torch.cat([s[1] for s in shards]), None, full[1].double(), F32)
    assert_close_rule("db", torch.cat([s[2] for s in shards]), None, full[2].double(), F32)


@pytest.mark.parametrize("layout", ["transposed-hidden-and-weight", "sliced-hidden", "1d-input",
                                    "empty-batch"])
def test_layouts_and_edge_shapes(layout):
    """Any strides (no copy: in-tile offsets fit int32), a single token, and an empty batch."""
    D, C = 64, 300
    if layout == "transposed-hidden-and-weight":
        x, w, y = torch.randn(D, 50).t(), torch.randn(D, C).t(), torch.randint(0, C, (50,))
    elif layout == "sliced-hidden":
        x, w, y = torch.randn(50, D + 9)[:, 3:D + 3], torch.randn(C, D), torch.randint(0, C, (50,))
    elif layout == "1d-input":
        x, w, y = torch.randn(D), torch.randn(C, D), torch.tensor(7)
    else:
        x, w, y = torch.randn(0, D), torch.randn(C, D), torch.zeros(0, dtype=torch.long)
    leaves = [t.detach().requires_grad_() for t in (x, w)]
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w)]
    loss = xent_triton.linear_cross_entropy(*leaves, y, label_smoothing=0.1, reduction="sum")
    ref = composed(*ref_leaves, None, y, label_smoothing=0.1, reduction="sum")
    loss.backward(torch.tensor(0.7))
    ref.backward(torch.tensor(0.7, dtype=F64))
    assert loss.shape == () and loss.dtype == F32
    assert_close_rule("loss", loss, None, ref, F32)
    for name, a, r in zip(("d_input", "d_weight"), leaves, ref_leaves):
        assert a.grad.shape == r.grad.shape
        assert_close_rule(name, a.grad, None, r.grad, F32)


def test_strided_class_ids_regression(device):
    """A strided 1-D target (a column of a (N, 2) tensor) once was read as if contiguous."""
    x = torch.randn(16, 64, device=device)
    W = torch.randn(100, 64, device=device)
    y = torch.randint(0, 100, (16, 2), device=device)[:, 0]
    assert not y.is_contiguous()
    ours = xent_triton.linear_cross_entropy(x, W, y, reduction="none")
    torch.testing.assert_close(ours, torch.nn.functional.cross_entropy(x @ W.t(), y, reduction="none"),
                               rtol=1e-5, atol=1e-5)
