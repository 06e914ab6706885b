"""Issue 17 "one options schema": ``LossOptions`` (the KL family: its subclass ``KLOptions``) reaches
every custom op as keyword-only arguments, one per field, by name (``core/op_schema.py``), flattened
by ``flat`` alone;
the backward's None gradients are counted from the op, never by hand. Adding a field needs no edit
at any op: a copy of the package with two fields added runs every op (a subprocess).
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import xent_triton
from xent_triton.core.exchange import agreement
from xent_triton.core.op_schema import input_grads, options_schema
from xent_triton.core.options import LossOptions
from xent_triton.kl.options import KLOptions, make_kl

OPTIONS_OPS = {"cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_bwd_soft",
               "cross_entropy_bwd_inplace", "linear_cross_entropy_fwd", "linear_cross_entropy_bwd",
               "linear_cross_entropy_chunked"}
# the KL family's ops take every KLOptions field (LossOptions' first, then the KL ones)
KL_OPS = {"distillation_fwd", "distillation_bwd", "token_logprobs_fwd", "token_logprobs_bwd",
          "linear_distillation_scalar",
          "linear_distillation_fwd", "linear_distillation_bwd", "linear_token_logprobs_fwd",
          "linear_token_logprobs_bwd"}
FIELDS = [f.name for f in dataclasses.fields(LossOptions)]
KL_FIELDS = [f.name for f in dataclasses.fields(KLOptions)]


def _schemas() -> dict:
    names = [n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("xent_triton::")]
    return {n: getattr(torch.ops.xent_triton, n).default._schema for n in names}


@pytest.mark.parametrize("cls,ops", [(LossOptions, OPTIONS_OPS), (KLOptions, KL_OPS)],
                         ids=["LossOptions", "KLOptions"])
def test_every_op_takes_the_options_as_keyword_only_fields(cls, ops):
    """Every xent_triton op takes exactly the fields of its options class (LossOptions; the KL
    family: KLOptions), keyword-only, by name, in field order, with the types of
    ``options_schema(cls)``; no field is passed positionally."""
    schemas = _schemas()
    assert OPTIONS_OPS | KL_OPS == set(schemas), "an op outside both tables: add it to one"
    fields = [f.name for f in dataclasses.fields(cls)]
    typed = [tuple(a.split()) for a in options_schema(cls).split(", ")]
    assert [n for _, n in typed] == fields
    for name in sorted(ops):
        args = schemas[name].arguments
        kw = [(str(a.type), a.name) for a in args if a.kwarg_only]
        assert [n for _, n in kw] == fields, f"{name}: keyword-only {kw}"
        assert [n for _, n in kw] == [n for _, n in typed] and all(
            t == s.replace("SymInt", "int") or t == s for (t, _), (s, _) in zip(kw, typed)), (name, kw, typed)
        positional = [a.name for a in args if not a.kwarg_only]
        assert not set(positional) & set(fields), f"{name}: an option passed positionally: {positional}"


def test_flat_is_the_one_form_and_round_trips():
    opts = LossOptions.make(ignore_index=7, reduction="sum", label_smoothing=0.25, lse_square_scale=1e-3,
                            softcap=12.0, logit_scale=0.5, empty_batch="zero")
    flat = opts.flat()
    assert list(flat) == FIELDS and len(flat) == len(options_schema().split(", "))
    assert LossOptions.from_flat(**flat) == opts
    assert {k: v for k, v in agreement(None, opts).items() if k in FIELDS}.keys() == flat.keys(), \
        "every field joins the options agreement of the vocabulary-parallel paths"


def test_kl_flat_round_trips():
    """KLOptions.from_flat (the classmethod, on the subclass) rebuilds every field, the KL ones
    (divergence a str, accum_fp32) included."""
    opts = make_kl(divergence="jsd", beta=0.3, temperature=0.7, ce_weight=0.25, ignore_index=5,
                   reduction="sum", empty_batch="zero", softcap=9.0, return_entropy=True, chunk_size=3,
                   has_token_weight=True, grad_accum_dtype=torch.bfloat16, weight_dtype=torch.bfloat16)
    flat = opts.flat()
    assert list(flat) == KL_FIELDS and flat["divergence"] == "jsd" and flat["accum_fp32"] is False
    back = KLOptions.from_flat(**flat)
    assert type(back) is KLOptions and back == opts


class _Ctx:
    needs_input_grad = (True, False, True, False, False)


def test_input_grads_pads_from_the_input_count():
    g = torch.ones(1)
    assert input_grads(_Ctx(), g, None, g) == (g, None, g, None, None)
    assert input_grads(_Ctx()) == (None,) * 5
    with pytest.raises(RuntimeError, match="6 gradients for 5 inputs"):
        input_grads(_Ctx(), *(g,) * 6)


PROBE = """
import torch, torch.nn.functional as F
import xent_triton
from tolerances import assert_close_rule
from xent_triton.core.exchange import agreement
from xent_triton.core.options import LossOptions
from xent_triton.kl.options import KLOptions, make_kl
for name in {ops!r}:
    s = str(getattr(torch.ops.xent_triton, name).default._schema)
    assert "float probe_scale" in s and "SymInt? probe_limit" in s, s
assert {{"probe_scale", "probe_limit"}} <= agreement(None, LossOptions()).keys()
g = torch.Generator().manual_seed(0)
N, C, D = 9, 37, 5
y = torch.randint(0, C, (N,), generator=g)
y[3] = -100
up = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
x0 = torch.randn(N, C, generator=g, dtype=torch.float64)
soft = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), -1)
h0 = torch.randn(N, D, generator=g, dtype=torch.float64)
w0 = torch.randn(C, D, generator=g, dtype=torch.float64)

def grads(fn, *leaves):
    leaves = [t.clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    (out * up).sum().backward() if out.dim() else (out * 0.7).backward()
    return (out.detach(), *(t.grad for t in leaves))

def check(name, ours, ref):
    for i, (a, r) in enumerate(zip(ours, ref)):
        assert_close_rule(f"{{name}}[{{i}}]", a, None, r, torch.float64)

kw = dict(label_smoothing=0.1, softcap=20.0, logit_scale=0.9, lse_square_scale=0.0)
ref_kw = dict(label_smoothing=0.1)
cap = lambda z: 20.0 * torch.tanh(0.9 * z / 20.0)
ce, lin = xent_triton.cross_entropy, xent_triton.linear_cross_entropy
for red in ("mean", "none"):
    ref = grads(lambda x: F.cross_entropy(cap(x), y, reduction=red, **ref_kw), x0)
    check(f"ce-{{red}}", grads(lambda x: ce(x, y, reduction=red, **kw), x0), ref)
    inplace = grads(lambda x: ce(x * 1.0, y, reduction=red, inplace_backward=True, **kw), x0)
    check(f"ce-inplace-{{red}}", inplace, ref)
    check(f"linear-{{red}}", grads(lambda h, w: lin(h, w, y, reduction=red, **kw), h0, w0),
          grads(lambda h, w: F.cross_entropy(cap(h @ w.T), y, reduction=red, **ref_kw), h0, w0))
check("ce-soft", grads(lambda x, t: xent_triton.cross_entropy(x, t, **kw), x0, soft),
      grads(lambda x, t: F.cross_entropy(cap(x), t, **ref_kw), x0, soft))
# the KL family (KLOptions inherits the two fields)
tok = y.clamp(min=0)
lp = lambda z: torch.log_softmax(z / 0.8, -1).gather(-1, tok[:, None])[:, 0]
kl = lambda s, t: (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)
t0, wt = torch.randn(N, C, generator=g, dtype=torch.float64), w0.flip(0)
check("token_logprobs", grads(lambda x: xent_triton.token_logprobs(x, tok, temperature=0.8), x0),
      grads(lp, x0))
check("linear_token_logprobs", grads(lambda h, w: xent_triton.linear_token_logprobs(
    h, w, tok, temperature=0.8, chunk_size=4), h0, w0), grads(lambda h, w: lp(h @ w.T), h0, w0))
check("distillation", grads(lambda x: xent_triton.distillation_loss(x, t0, reduction="none"), x0),
      grads(lambda x: kl(x, t0), x0))
check("linear_distillation", grads(lambda h, w: xent_triton.linear_distillation_loss(
    h, w, h0, wt, reduction="none", chunk_size=4), h0, w0),
      grads(lambda h, w: kl(h @ w.T, h0 @ wt.T), h0, w0))
check("linear_distillation_mean", grads(lambda h, w: xent_triton.linear_distillation_loss(
    h, w, h0, wt, chunk_size=4), h0, w0), grads(lambda h, w: kl(h @ w.T, h0 @ wt.T).mean(), h0, w0))
print("probe ok")
"""


def test_a_new_option_field_needs_no_edit_at_any_op(tmp_path):
    """A copy of the package whose LossOptions has two more fields (a float and an Optional[int])
    registers every op with them (the KL family's too: KLOptions inherits them), agrees on them,
    and runs every op forward and backward (the torch path, float64) against torch: nothing but the
    dataclass was edited."""
    pkg = pathlib.Path(xent_triton.__file__).parent
    shutil.copytree(pkg, tmp_path / "xent_triton", ignore=shutil.ignore_patterns("__pycache__"))
    options = tmp_path / "xent_triton" / "core" / "options.py"
    src = options.read_text()
    last = '    empty_batch: str = "nan"\n'
    assert src.count(last) == 1
    options.write_text(src.replace(last, last + "    probe_scale: float = 0.5\n"
                                   "    probe_limit: Optional[int] = None\n"))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [str(tmp_path), str(pathlib.Path(__file__).resolve().parents[1] / "harness")]))
    script = textwrap.dedent(PROBE.format(ops=sorted(OPTIONS_OPS | KL_OPS)))
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "probe ok" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]


# ----------------------------------------------------- validation under torch.compile(dynamic=True)
def _heads(name: str):
    g = torch.Generator().manual_seed(11)
    x, h, w = torch.randn(7, 50, generator=g), torch.randn(7, 8, generator=g), torch.randn(50, 8, generator=g)
    y = torch.randint(0, 50, (7,), generator=g)
    if name == "ce":
        return lambda **kw: xent_triton.cross_entropy(x, y, **kw)
    return lambda **kw: xent_triton.linear_cross_entropy(h, w, y, **kw)


BAD_UNDER_COMPILE = [("logit_scale", math.inf), ("logit_scale", math.nan), ("lse_square_scale", math.inf),
                     ("lse_square_scale", -math.nan), ("label_smoothing", 2.0), ("softcap", -5.0)]


@pytest.mark.parametrize("head", ["ce", "linear"])
@pytest.mark.parametrize("name,value", [pytest.param(n, v, id=f"{n}={v}") for n, v in BAD_UNDER_COMPILE])
def test_invalid_option_raises_under_compile_dynamic(head, name, value):
    """The validation's finiteness check is traced by dynamo (comparisons, not math.isfinite): an
    infinite / NaN option raises the same ValueError compiled as eagerly (it passed before)."""
    loss = _heads(head)
    compiled = torch.compile(lambda v: loss(**{name: v}), backend="eager", dynamic=True)
    with pytest.raises(ValueError, match=f"{name} must be"):
        loss(**{name: value})
    with pytest.raises(ValueError, match=f"{name} must be"):
        compiled(value)


def test_symbolic_ignore_index_is_never_forced():
    """fullgraph, dynamic=True: ignore_index arrives symbolic, is validated and crosses the op schemas
    (SymInt) without being forced: a new value runs the same graph, equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    cnt = CompileCounterWithBackend("aot_eager")
    ce, lin = _heads("ce"), _heads("linear")

    def both(ii):
        return ce(ignore_index=ii, label_smoothing=0.1) + lin(ignore_index=ii, softcap=5.0)

    compiled = torch.compile(both, backend=cnt, fullgraph=True, dynamic=True)
    frames = []
    for ii in (3, 4, 5):
        assert torch.equal(compiled(ii), both(ii))
        frames.append(cnt.frame_count)
    assert frames[1] == frames[2], f"recompiled for a new ignore_index: {frames}"
