"""Each formula once: every jit helper of core/formulas_triton.py against its torch twin of the same
name in core/formulas_torch.py, on the same inputs, edge values included.

Each helper runs inside a tiny wrapper kernel (one program per row, the row's lanes in one masked
block; the interpreter on CPU), its twin on the same float32 rows; both are checked against the twin
in float64 on those inputs by the suite's one rule (tests/tolerances.py: ours <= max(2 x the float32
twin's error, the float32 floor)); integer outputs (the argmax) must be equal. Edge rows: a row of
-inf logits, a half -inf row, a row below -88 (exp underflows), a row near 1e4, a row of ties;
softcap 0, 30 and 1e30 (softcap -> infinity: the identity), C = 1, all-ignored targets and
out-of-range ids. ``test_every_helper_has_one_twin`` fails for a helper without a twin (or a twin
or a case without a helper).
"""
import inspect

import pytest
import torch
import triton
import triton.language as tl

from tolerances import assert_close_rule
from xent_triton.core import formulas_torch as ft
from xent_triton.core import formulas_triton as fj

R = 8
IGNORE = -100


def jit_helpers() -> set:
    """Names of the @triton.jit functions defined in core/formulas_triton.py."""
    return {n for n, v in vars(fj).items()
            if hasattr(v, "fn") and inspect.isfunction(v.fn) and v.fn.__module__ == fj.__name__}


def torch_twins() -> set:
    """Names of the functions defined in core/formulas_torch.py."""
    return {n for n, v in vars(ft).items() if inspect.isfunction(v) and v.__module__ == ft.__name__}


# ------------------------------------------------------------------------------ wrapper kernels
@triton.jit
def k_elementwise(a_ptr, b_ptr, out_ptr, C, p0, p1, WHICH: tl.constexpr, FLAG: tl.constexpr,
                  BLOCK: tl.constexpr):
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    a = tl.load(a_ptr + r * C + cols, mask=mask, other=0.0)
    b = tl.load(b_ptr + r * C + cols, mask=mask, other=0.0)
    if WHICH == 0:
        out = fj.tanh_f32(a)
    elif WHICH == 1:
        out = fj.transform_logits(a, p0, p1, FLAG)
    elif WHICH == 2:
        out = fj.transform_grad(b, a, p0, p1, FLAG)  # (dz = b, z = a)
    elif WHICH == 3:
        out = fj.smoothed_target(a, p0, p1, FLAG)
    else:
        out = fj.safe_ref(a)
    tl.store(out_ptr + r * C + cols, out, mask=mask)


@triton.jit
def k_online_lse_update(z_ptr, m_ptr, s_ptr, out_ptr, C, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    z = tl.load(z_ptr + r * C + cols, mask=cols < C, other=float("-inf"))
    m, s, ref_old, ref_new = fj.online_lse_update(tl.load(m_ptr + r), tl.load(s_ptr + r), z)
    tl.store(out_ptr + 4 * r, m)
    tl.store(out_ptr + 4 * r + 1, s)
    tl.store(out_ptr + 4 * r + 2, ref_old)
    tl.store(out_ptr + 4 * r + 3, ref_new)


@triton.jit
def k_row_block(z_ptr, a_ptr, v_ptr, out_ptr, C, p0, WHICH: tl.constexpr, BLOCK: tl.constexpr):
    """softmax_from_stats (v = ref, log s) / soft_target_grad (v = g, ref, log s; p0 = eps)."""
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    z = tl.load(z_ptr + r * C + cols, mask=mask, other=0.0)
    if WHICH == 0:
        out = fj.softmax_from_stats(z, tl.load(v_ptr + 3 * r + 1), tl.load(v_ptr + 3 * r + 2))
    else:
        out = fj.soft_target_grad(tl.load(v_ptr + 3 * r), z, tl.load(v_ptr + 3 * r + 1),
                                  tl.load(v_ptr + 3 * r + 2), p0)
    tl.store(out_ptr + r * C + cols, out, mask=mask)


@triton.jit
def k_weight_total(wsum_ptr, out_ptr, n_classes, HAS_WEIGHT: tl.constexpr):
    tl.store(out_ptr, fj.weight_total(wsum_ptr, n_classes, HAS_WEIGHT))


@triton.jit
def k_row_scalars(v_ptr, y_ptr, out_ptr, ignore_index, eps, n_classes, w_total, WHICH: tl.constexpr,
                  HAS_SMOOTHING: tl.constexpr):
    """Per-row helpers of scalars: v = 3 values per row, y the row's class id."""
    r = tl.program_id(0)
    v0 = tl.load(v_ptr + 3 * r)
    v1 = tl.load(v_ptr + 3 * r + 1)
    v2 = tl.load(v_ptr + 3 * r + 2)
    y = tl.load(y_ptr + r)
    if WHICH == 0:
        o0, o1, o2 = fj.hard_target_coefficients(v0, v1, v2, y != ignore_index, eps, n_classes, w_total,
                                                 HAS_SMOOTHING)
    elif WHICH == 1:
        o0 = fj.hard_target_loss(v0, v1, v2, eps, n_classes, HAS_SMOOTHING)
        o1 = o0
        o2 = o0
    elif WHICH == 2:
        o0, o1 = fj.finish_hard_rows(v0, v1, y, ignore_index, n_classes)
        o2 = o0
    else:
        o0 = fj.entropy_from_sums(v0, v1, v2)
        o1 = o0
        o2 = o0
    tl.store(out_ptr + 3 * r, o0)
    tl.store(out_ptr + 3 * r + 1, o1)
    tl.store(out_ptr + 3 * r + 2, o2)


@triton.jit
def k_block_sums(z_ptr, a_ptr, v_ptr, idx_ptr, out_ptr, idx_out_ptr, C, col0, WHICH: tl.constexpr,
                 BLOCK: tl.constexpr):
    """entropy_argmax_update (v = e, best, s_old, ref_old, ref_new) / weighted_sum_update
    (v = acc, a_sum, -, ref_old, ref_new) / entropy_update (v = e, -, s_old, ...) of one block."""
    r = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    z = tl.load(z_ptr + r * C + offs, mask=mask, other=float("-inf"))
    v = v_ptr + 5 * r
    if WHICH == 0:
        e, best, idx = fj.entropy_argmax_update(tl.load(v), tl.load(v + 1), tl.load(idx_ptr + r),
                                                tl.load(v + 2), z, col0 + offs, tl.load(v + 3),
                                                tl.load(v + 4))
        tl.store(out_ptr + 2 * r, e)
        tl.store(out_ptr + 2 * r + 1, best)
        tl.store(idx_out_ptr + r, idx)
    elif WHICH == 2:
        e = fj.entropy_update(tl.load(v), tl.load(v + 2), z, tl.load(v + 3), tl.load(v + 4))
        tl.store(out_ptr + 2 * r, e)
        tl.store(out_ptr + 2 * r + 1, 0.0)
    else:
        a = tl.load(a_ptr + r * C + offs, mask=mask, other=0.0)
        acc, a_sum = fj.weighted_sum_update(tl.load(v), tl.load(v + 1), a, z, mask, tl.load(v + 3),
                                            tl.load(v + 4))
        tl.store(out_ptr + 2 * r, acc)
        tl.store(out_ptr + 2 * r + 1, a_sum)


# ------------------------------------------------------------------------------ inputs
def logit_rows(C: int, seed: int) -> torch.Tensor:
    """(R, C) float32 logits with the edge rows of the module docstring."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(R, C, generator=g) * 4
    z[0] = float("-inf")
    z[1, : max(1, C // 2)] = float("-inf")
    z[2] = -200 + torch.randn(C, generator=g)
    z[3] = 1e4 + 3 * torch.randn(C, generator=g)
    z[4] = 1.5
    return z


def state(z: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A running (m, s) before the block: nothing seen yet on rows 0 and 2, else a previous block's."""
    g = torch.Generator().manual_seed(seed + 1)
    m = torch.where(torch.isfinite(z).any(1), z.amax(1) + torch.randn(R, generator=g), float("-inf"))
    m[[0, 2]] = float("-inf")
    s = torch.where(m == float("-inf"), 0.0, torch.rand(R, generator=g) * 5 + 0.5)
    return m, s


def class_ids(C: int, which: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 2)
    if which == "all_ignored":
        return torch.full((R,), IGNORE, dtype=torch.int64)
    y = torch.randint(0, C, (R,), generator=g)
    y[1], y[5], y[6] = IGNORE, -5, C + 3  # ignored, out of range both ways
    return y


def per_row(seed: int, *scale) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 3)
    return torch.randn(R, len(scale), generator=g) * torch.tensor(scale)


def twin_check(name: str, ours, twin, *args):
    """``ours`` (the jit helper's outputs) against the twin's on the float32 ``args`` and on them in
    float64 (the reference of the rule); integer outputs must be equal."""
    up = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    t32, t64 = twin(*args), twin(*up)
    t32 = t32 if isinstance(t32, tuple) else (t32,)
    t64 = t64 if isinstance(t64, tuple) else (t64,)
    ours = ours if isinstance(ours, tuple) else (ours,)
    assert len(ours) == len(t32)
    for i, (o, a, b) in enumerate(zip(ours, t32, t64)):
        if not o.is_floating_point():
            assert torch.equal(o, a), f"{name}[{i}]: {o.tolist()} != twin {a.tolist()}"
            assert torch.equal(o, b), f"{name}[{i}]: {o.tolist()} != float64 twin {b.tolist()}"
        else:
            assert_close_rule(f"{name}[{i}]", o, a, b.to(torch.float64).expand(o.shape), torch.float32)


def block(C: int) -> int:
    return triton.next_power_of_2(C)


# ------------------------------------------------------------------------------ one case per helper
def run_elementwise(which: int, name: str, C: int, seed: int, softcap: float, eps: float):
    z = logit_rows(C, seed)
    z = torch.where(torch.isfinite(z), z, -50.0) if which != 4 else z  # a transform of -inf is -inf / NaN
    scale = 0.7
    cap, off = (scale, softcap, softcap > 0), (0.0, 0.0, False)
    p0, p1, flag = {0: off, 1: cap, 2: cap, 3: (eps, float(C), eps > 0), 4: off}[which]
    if which == 2:
        z = ft.transform_logits(z, scale, softcap)  # the backward gets transformed logits
    if which == 3:
        z = torch.rand(R, C, generator=torch.Generator().manual_seed(seed)).softmax(1)
    if which == 4:
        z = torch.cat([z[:, :1], torch.full((R, 1), float("-inf"))], 1)
    dz = per_row(seed, 1.0) * torch.rand(z.shape, generator=torch.Generator().manual_seed(seed))
    out = torch.empty_like(z)
    k_elementwise[(R,)](z, dz, out, z.shape[1], p0, p1, WHICH=which, FLAG=flag, BLOCK=block(z.shape[1]))
    args = {0: (z,), 1: (z, scale, softcap), 2: (dz, z, scale, softcap), 3: (z, eps, C), 4: (z,)}[which]
    twin_check(name, out, getattr(ft, name), *args)


def run_online_lse_update(C, seed, softcap, eps):
    z = logit_rows(C, seed)
    m, s = state(z, seed)
    out = torch.empty(R, 4)
    k_online_lse_update[(R,)](z, m, s, out, C, BLOCK=block(C))
    twin_check("online_lse_update", tuple(out.unbind(1)), ft.online_lse_update, m, s, z)


def stats_of(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m0 = torch.full((R,), float("-inf"))
    _, s, _, ref = ft.online_lse_update(m0, torch.zeros(R), z)
    return ref, torch.log(s)


def run_row_block(which: int, name: str, C: int, seed: int, eps: float):
    z = logit_rows(C, seed)
    ref, log_s = stats_of(z)
    g = per_row(seed, 0.3)[:, 0]
    v = torch.stack([g, ref, log_s], 1).contiguous()
    out = torch.empty_like(z)
    k_row_block[(R,)](z, z, v, out, C, eps, WHICH=which, BLOCK=block(C))
    if which == 0:
        twin_check(name, out, ft.softmax_from_stats, z, ref, log_s)
    else:
        twin_check(name, out, ft.soft_target_grad, g, z, ref, log_s, eps)


def run_weight_total(C, seed, softcap, eps):
    wsum = torch.rand(1, generator=torch.Generator().manual_seed(seed)) * C
    for has in (True, False):
        out = torch.empty(1)
        k_weight_total[(1,)](wsum, out, C, HAS_WEIGHT=has)
        twin_check("weight_total", out[0], lambda w: torch.as_tensor(ft.weight_total(w, C), dtype=out.dtype),
                   wsum if has else None)


def run_row_scalars(which: int, name: str, C: int, seed: int, eps: float, targets: str):
    y = class_ids(C, targets, seed)
    v = per_row(seed, 1.0, 0.5, 2.0)
    if which == 3:  # entropy_from_sums(log s, E, s) of real rows
        z = logit_rows(C, seed)
        m0, zero = torch.full((R,), float("-inf")), torch.zeros(R)
        _, s, ref_old, ref_new = ft.online_lse_update(m0, zero, z)
        e, _, _ = ft.entropy_argmax_update(zero, m0, torch.zeros(R, dtype=torch.int64), zero, z,
                                           torch.arange(C), ref_old, ref_new)
        v = torch.stack([torch.log(s), e, s], 1)
    v = v.contiguous()
    w_total = 3.25
    out = torch.empty(R, 3)
    k_row_scalars[(R,)](v, y, out, IGNORE, eps, C, w_total, WHICH=which, HAS_SMOOTHING=eps > 0)
    cols = v.unbind(1)
    if which == 0:
        twin_check(name, tuple(out.unbind(1)), ft.hard_target_coefficients, cols[0], cols[1], cols[2],
                   y != IGNORE, eps, C, w_total)
    elif which == 1:
        twin_check(name, out[:, 0], ft.hard_target_loss, cols[0], cols[1], cols[2], eps, C)
    elif which == 2:
        twin_check(name, (out[:, 0], out[:, 1]), ft.finish_hard_rows, cols[0], cols[1], y, IGNORE, C)
    else:
        twin_check(name, out[:, 0], ft.entropy_from_sums, *cols)


def run_block_sums(which: int, name: str, C: int, seed: int):
    z = logit_rows(C, seed)
    m, s = state(z, seed)
    _, _, ref_old, ref_new = ft.online_lse_update(m, s, z)
    prev = per_row(seed, 2.0, 1.0)
    first = m == float("-inf")  # nothing seen yet: E = 0, best = -inf, index 0
    e0 = torch.where(first, 0.0, prev[:, 0].abs())
    best = torch.where(first, float("-inf"), m)
    idx = torch.where(first, 0, 3).to(torch.int64)
    col0 = 5
    v = torch.stack([e0 if which != 1 else prev[:, 0], best if which != 1 else prev[:, 1].abs(), s,
                     ref_old, ref_new], 1).contiguous()
    a = torch.rand(R, C, generator=torch.Generator().manual_seed(seed)) + 0.1
    out, idx_out = torch.empty(R, 2), torch.empty(R, dtype=torch.int64)
    k_block_sums[(R,)](z, a, v, idx, out, idx_out, C, col0, WHICH=which, BLOCK=block(C))
    if which == 0:
        twin_check(name, (out[:, 0], out[:, 1], idx_out), ft.entropy_argmax_update, e0, best, idx, s, z,
                   torch.arange(C) + col0, ref_old, ref_new)
    elif which == 2:
        twin_check(name, out[:, 0], ft.entropy_update, e0, s, z, ref_old, ref_new)
    else:
        twin_check(name, (out[:, 0], out[:, 1]), ft.weighted_sum_update, v[:, 0], v[:, 1], a, z, None,
                   ref_old, ref_new)


def run(kind: str, which: int):
    """The case runner of one helper: (C, seed, softcap, eps, targets) -> None."""
    def case(C, seed, cap, eps, targets):
        name = NAMES[(kind, which)]
        if kind == "elementwise":
            run_elementwise(which, name, C, seed, cap, eps)
        elif kind == "lse":
            run_online_lse_update(C, seed, cap, eps)
        elif kind == "row_block":
            run_row_block(which, name, C, seed, eps)
        elif kind == "weight_total":
            run_weight_total(C, seed, cap, eps)
        elif kind == "row_scalars":
            run_row_scalars(which, name, C, seed, eps, targets)
        else:
            run_block_sums(which, name, C, seed)
    return case


NAMES = {("elementwise", 0): "tanh_f32", ("elementwise", 1): "transform_logits",
         ("elementwise", 2): "transform_grad", ("elementwise", 3): "smoothed_target",
         ("elementwise", 4): "safe_ref", ("lse", 0): "online_lse_update",
         ("row_block", 0): "softmax_from_stats", ("row_block", 1): "soft_target_grad",
         ("weight_total", 0): "weight_total", ("row_scalars", 0): "hard_target_coefficients",
         ("row_scalars", 1): "hard_target_loss", ("row_scalars", 2): "finish_hard_rows",
         ("row_scalars", 3): "entropy_from_sums", ("block_sums", 0): "entropy_argmax_update",
         ("block_sums", 1): "weighted_sum_update", ("block_sums", 2): "entropy_update"}
CASES = {name: run(kind, which) for (kind, which), name in NAMES.items()}

# (C, softcap, label smoothing, targets): C = 1, odd C; softcap off / on / -> infinity; all ignored
EDGES = [(1, 0.0, 0.0, "mixed"), (37, 30.0, 0.1, "mixed"), (37, 1e30, 0.0, "all_ignored"),
         (129, 0.0, 0.2, "all_ignored")]


def test_every_helper_has_one_twin():
    """The set of jit helpers == the set of torch twins == the helpers this file runs."""
    helpers, twins = jit_helpers(), torch_twins()
    assert helpers, "no jit helper found in core/formulas_triton.py"
    assert helpers - twins == set(), f"jit helpers without a torch twin: {sorted(helpers - twins)}"
    assert twins - helpers == set(), f"torch functions without a jit helper: {sorted(twins - helpers)}"
    assert set(CASES) == helpers, f"helpers without a twin case here: {sorted(helpers - set(CASES))}"


@pytest.mark.parametrize("C,softcap,eps,targets", EDGES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_helper_matches_twin(name, C, softcap, eps, targets):
    CASES[name](C, 1000 + C, softcap, eps, targets)


@pytest.mark.parametrize("target", ["soft", "smooth"])
def test_torch_path_rows_below_exp_range(target):
    """Regression: the torch online log-sum-exp (the CPU path of a soft target, the vocabulary-parallel
    torch path) scaled an empty sum by exp(0 - ref) = inf for rows whose logits are all below -88:
    0 * inf = NaN. It now runs the kernels' twin ``online_lse_update`` (no shift before any logit)."""
    from xent_triton.core.options import LossOptions
    from xent_triton.cross_entropy import rows_torch

    g = torch.Generator().manual_seed(7)
    x = -200 + torch.randn(5, 37, 3, generator=g)
    opts = LossOptions(label_smoothing=0.1)
    if target == "soft":
        t = torch.softmax(torch.randn(5, 37, 3, generator=g), 1)
        ref = -(t.double() * torch.log_softmax(x.double(), 1)).sum(1).reshape(-1)
        loss = rows_torch.forward_chunked(x, t, None, LossOptions())[0]
    else:
        from xent_triton.core.partials import chunked_partials, combine
        y = torch.randint(0, 37, (15,), generator=g)
        ref = torch.nn.functional.cross_entropy(x.double(), y.view(5, 3), reduction="none",
                                                label_smoothing=0.1).reshape(-1)
        loss = combine(chunked_partials(x, y, None, 37, opts), y, None, 37, opts)[0]
    assert_close_rule("loss", loss, None, ref, torch.float32)
