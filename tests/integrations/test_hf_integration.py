"""xent_triton.integrations.transformers against the stock transformers models, in float32.

Each (architecture, case, path) runs one tiny random-init model twice, stock and through xent (the
logits path: ``patch_loss_functions``; the fused head: ``apply``), and compares the loss and every
parameter gradient. CI runs a representative subset; ``python -m perf.hf_check`` runs all of it.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import xent_triton
from hf_cases import ARCHS, FULL, VOCAB, assert_grads_close, batch, grads, tiny_model, twin
from xent_triton.integrations import transformers as xhf


def _spy(monkeypatch, name: str) -> list:
    """Count the calls of ``xent_triton.<name>`` (the integration looks it up per call)."""
    calls, fn = [], getattr(xent_triton, name)

    def spy(*a, **k):
        calls.append((a, k))
        return fn(*a, **k)

    monkeypatch.setattr(xent_triton, name, spy)
    return calls


@pytest.fixture
def patched_losses():
    xhf.patch_loss_functions()
    yield
    xhf.unpatch_loss_functions()


# ---- the matrix: every case builds the forward's kwargs from one batch ----------------------------------

def _shifted(labels):
    return F.pad(labels, (0, 1), value=-100)[:, 1:]


def _case_kwargs(case: str, ids, mask, labels) -> dict:
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if case == "num_items_tensor":  # as the Trainer passes it: the count of the 3 accumulated micro-batches
        kw["num_items_in_batch"] = 3 * (_shifted(labels) != -100).sum()
    elif case == "num_items_int":
        kw["num_items_in_batch"] = int(2 * (_shifted(labels) != -100).sum())
    elif case == "shift_labels":  # pre-shifted targets that are not labels shifted: proves they are used
        g = torch.Generator().manual_seed(7)
        kw["shift_labels"] = torch.randint(0, VOCAB, labels.shape, generator=g).masked_fill(mask == 0, -100)
    elif case == "logits_to_keep":  # the last 5 positions' logits, and their targets as shift_labels
        kw["logits_to_keep"] = 5
        kw["shift_labels"] = _shifted(labels)[:, -5:].contiguous()
    return kw


CASES = ("padded", "num_items_tensor", "num_items_int", "shift_labels", "logits_to_keep")
PATHS = ("fused", "logits")
CI_SUBSET = {
    **{(a, "padded", "fused"): True for a in ARCHS},
    **{("llama", c, p): True for c in CASES for p in PATHS},
    ("gemma2", "num_items_tensor", "fused"): True, ("gemma2", "shift_labels", "fused"): True,
    ("gemma2", "logits_to_keep", "fused"): True, ("granite", "num_items_tensor", "fused"): True,
    ("cohere", "shift_labels", "fused"): True, ("mixtral", "num_items_tensor", "fused"): True,
    ("qwen2_moe", "shift_labels", "fused"): True, ("gemma2", "padded", "logits"): True,
    ("mixtral", "padded", "logits"): True,
}
MATRIX = [pytest.param(a, c, p, id=f"{a}-{c}-{p}") for a in ARCHS for c in CASES for p in PATHS
          if FULL or (a, c, p) in CI_SUBSET]


@pytest.mark.parametrize("arch,case,path", MATRIX)
def test_loss_and_every_gradient_match_stock(arch, case, path, monkeypatch):
    ref = tiny_model(arch)
    model = twin(ref)
    ids, mask, labels = batch()
    kw = _case_kwargs(case, ids, mask, labels)
    out_ref = ref(**kw)
    out_ref.loss.backward()
    calls = _spy(monkeypatch, "linear_cross_entropy" if path == "fused" else "cross_entropy")
    if path == "fused":
        xhf.apply(model)
    else:
        xhf.patch_loss_functions()
    try:
        out = model(**kw)
        out.loss.backward()
    finally:
        xhf.unpatch_loss_functions()
    assert len(calls) == 1, "the loss must come from xent_triton"
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(model), grads(ref))
    if path == "fused":
        assert out.logits is None  # training with labels: never materialised
    else:
        torch.testing.assert_close(out.logits, out_ref.logits)
    if ref.config.get_text_config().to_dict().get("output_router_logits"):
        assert out.aux_loss is not None and out_ref.aux_loss is not None
        torch.testing.assert_close(out.aux_loss, out_ref.aux_loss)


@pytest.mark.parametrize("arch", [pytest.param(a, id=a) for a in ("mixtral", "qwen2_moe")
                                  if FULL or a == "mixtral"])
def test_moe_total_loss_includes_aux_loss(arch):
    model = xhf.apply(tiny_model(arch))
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    ce = xhf.apply(tiny_model(arch, output_router_logits=False))(input_ids=ids, attention_mask=mask,
                                                                 labels=labels).loss
    coef = model.config.router_aux_loss_coef
    assert out.aux_loss is not None and float(out.aux_loss) > 0
    torch.testing.assert_close(out.loss, ce + coef * out.aux_loss, rtol=1e-5, atol=1e-6)


# ---- fused head: behaviour around the loss ----------------------------------------------------------------

@pytest.mark.parametrize("path", [pytest.param(p, id=p) for p in PATHS])
def test_fully_ignored_batch_gives_zero_loss_and_zero_grads(path):
    model = tiny_model("llama")
    ids, mask, _ = batch()
    labels = torch.full_like(ids, -100)
    if path == "fused":
        xhf.apply(model)
    else:
        xhf.patch_loss_functions()
    try:
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    finally:
        xhf.unpatch_loss_functions()
    assert out.loss.item() == 0.0 and out.loss.requires_grad  # torch's mean gives NaN here
    out.loss.backward()
    g = grads(model)
    assert g["lm_head.weight"] is not None
    assert all(torch.count_nonzero(t) == 0 for t in g.values() if t is not None)


def test_eval_keeps_logits_and_skip_logits_per_call():
    ref = tiny_model("llama").eval()
    model = xhf.apply(twin(ref))
    ids, mask, labels = batch()
    with torch.no_grad():
        out, out_ref = model(input_ids=ids, attention_mask=mask, labels=labels), ref(input_ids=ids,
                                                                                     attention_mask=mask,
                                                                                     labels=labels)
        torch.testing.assert_close(out.logits, out_ref.logits)  # compute_metrics still gets logits
        torch.testing.assert_close(out.loss, out_ref.loss)
        forced = model(input_ids=ids, attention_mask=mask, labels=labels, skip_logits=True)
        assert forced.logits is None
        torch.testing.assert_close(forced.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    model.train()
    assert model(input_ids=ids, labels=labels, skip_logits=False).logits is not None
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=ids, skip_logits=True)


def test_logits_to_keep_without_labels_and_conflicting_labels():
    ref = tiny_model("gemma2").eval()
    model = xhf.apply(twin(ref))
    ids, mask, labels = batch()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        b = ref(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    assert a.logits.shape == (2, 1, VOCAB)
    torch.testing.assert_close(a.logits, b.logits)
    model.train(), ref.train()
    with pytest.raises(ValueError):  # the stock model fails too (the logits and labels disagree)
        ref(input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=4)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=4)


@pytest.mark.parametrize("variant", [pytest.param(v, id=v) for v in ("lm_head_bias", "tied_embeddings")])
def test_lm_head_bias_and_tied_embeddings(variant):
    if variant == "tied_embeddings":
        ref = tiny_model("llama", tie_word_embeddings=True)
        assert ref.lm_head.weight is ref.get_input_embeddings().weight
    else:
        ref = tiny_model("llama")
        ref.lm_head = torch.nn.Linear(64, VOCAB, bias=True)
        torch.nn.init.normal_(ref.lm_head.bias, std=0.5)
    model = xhf.apply(twin(ref))
    ids, mask, labels = batch()
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out_ref.loss.backward(), out.loss.backward()
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(model), grads(ref))


@pytest.mark.parametrize("arch", [pytest.param(a, id=a) for a in ("llama", "mixtral")])
def test_tuple_output_keeps_the_stock_layout(arch):
    """Issue 18 item 14: return_dict=False in training gives the stock tuple, None in the logits slot."""
    ref = tiny_model(arch)
    model = xhf.apply(twin(ref))
    ids, mask, labels = batch()
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False, use_cache=True)
    out, out_ref = model(**kw), ref(**kw)
    names = list(ref(**{**kw, "return_dict": True}).keys())  # loss, (aux_loss,) logits, cache
    assert isinstance(out, tuple) and len(out) == len(out_ref) == len(names)
    for name, got, want in zip(names, out, out_ref):
        if name == "logits":
            assert got is None and want.shape[-1] == VOCAB
        elif name in ("past_key_values", "cache"):
            assert type(got) is type(want)
        else:  # loss, aux_loss
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_pickle_round_trip_of_an_applied_model():
    """Issue 18 item 13: torch.save / pickle of an applied model (no lambda or closure left on it)."""
    import io
    import pickle

    model = xhf.apply(tiny_model("granite"))
    ids, mask, labels = batch()
    buf = io.BytesIO()
    torch.save(model, buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    for copy in (pickle.loads(pickle.dumps(model)), saved):
        assert xhf.is_applied(copy) and copy.lm_head._xent_fused is copy._xent_fused
        out = copy(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits is None
        torch.testing.assert_close(out.loss, model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        xhf.revert(copy)
        assert copy(input_ids=ids, labels=labels).logits is not None


@pytest.mark.parametrize("arch,train", [pytest.param("gemma2", True, id="gemma2-fused"),
                                        pytest.param("llama", False, id="llama-logits")])
def test_token_accuracy_matches_float64(arch, train):
    ref = tiny_model(arch)
    model = xhf.apply(twin(ref)).train(train)
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, return_token_accuracy=True)
    with torch.no_grad():
        logits = ref.train(train)(input_ids=ids, attention_mask=mask).logits.double()
    y = _shifted(labels)
    valid = y != -100
    want = ((logits.argmax(-1) == y) & valid).sum().double() / valid.sum()
    assert (out.logits is None) == train
    torch.testing.assert_close(out.token_accuracy.double(), want)
    assert int(out.loss_stats.n_valid) == int(valid.sum())
    p = torch.softmax(logits, -1)
    entropy = (-(p * torch.log(p)).sum(-1) * valid).sum()
    torch.testing.assert_close(out.loss_stats.entropy_sum.double(), entropy, rtol=1e-5, atol=1e-5)


def test_unsupported_forward_raises_and_standard_forward_is_served():
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            hidden_states = self.model(input_ids=input_ids, **kwargs).last_hidden_state
            logits = self.lm_head(hidden_states)
            logits = logits * 2.0
            return self.loss_function(logits, labels, self.config.vocab_size)

    class Renamed(LlamaForCausalLM):  # Llama's own (standard) forward under another class name
        pass

    with pytest.raises(NotImplementedError, match="LlamaForCausalLM.*Gemma2ForCausalLM"):
        xhf.apply(Scaled(tiny_model("llama").config))
    ref = tiny_model("llama")
    model = Renamed(ref.config).float()
    model.load_state_dict(ref.state_dict())
    xhf.apply(model)
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref(input_ids=ids, attention_mask=mask, labels=labels).loss,
                               rtol=1e-5, atol=1e-6)


def test_revert_restores_the_stock_model():
    model = tiny_model("granite")
    head = model.get_output_embeddings()
    assert xhf.apply(model) is model and xhf.is_applied(model)
    xhf.revert(model)
    assert not xhf.is_applied(model)
    assert "forward" not in vars(model) and "forward" not in vars(head)
    assert "_loss_function" not in vars(model)
    ids, mask, labels = batch()
    assert model(input_ids=ids, labels=labels).logits is not None


def test_deepcopy_of_patched_model_is_independent():
    model = xhf.apply(tiny_model("llama"))
    copy = twin(model)
    assert copy._xent_fused is not model._xent_fused and copy.lm_head._xent_fused is copy._xent_fused
    ids, mask, labels = batch()
    out = copy(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert out.logits is None and copy.lm_head.weight.grad is not None and model.lm_head.weight.grad is None


# ---- logits path -------------------------------------------------------------------------------------------

def test_patch_loss_functions_by_identity_and_unpatch():
    import transformers.trainer as hf_trainer
    from transformers.loss import loss_utils

    stock = loss_utils.ForCausalLMLoss
    stock_keys = sorted(k for k, f in loss_utils.LOSS_MAPPING.items() if f is stock)
    assert {"ForCausalLM", "ForConditionalGeneration"} <= set(stock_keys)
    try:
        assert sorted(xhf.patch_loss_functions()) == stock_keys
        for k in stock_keys:
            assert loss_utils.LOSS_MAPPING[k] is xhf.ForCausalLMLoss
        assert loss_utils.LOSS_MAPPING[k].__name__.endswith("ForCausalLMLoss")
        # the Trainer counts num_items_in_batch over the shifted labels only if this identity holds
        assert loss_utils.LOSS_MAPPING["ForCausalLM"] is hf_trainer.ForCausalLMLoss
        assert xhf.is_patched()
    finally:
        xhf.unpatch_loss_functions()
    assert not xhf.is_patched()
    assert all(loss_utils.LOSS_MAPPING[k] is stock for k in stock_keys)
    assert hf_trainer.ForCausalLMLoss is stock and loss_utils.ForCausalLMLoss is stock


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("num_items", [pytest.param(None, id="mean"), pytest.param(7, id="int"),
                                       pytest.param(torch.tensor(9), id="tensor")])
def test_for_causal_lm_loss_matches_transformers(dtype, num_items, monkeypatch):
    from transformers.loss.loss_utils import ForCausalLMLoss as stock

    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(2, 6, 300, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, 300, (2, 6), generator=g)
    labels[0, :2] = -100
    seen = []
    fn = xent_triton.cross_entropy
    monkeypatch.setattr(xent_triton, "cross_entropy", lambda x, *a, **k: seen.append(x) or fn(x, *a, **k))
    loss = xhf.ForCausalLMLoss(logits, labels, vocab_size=300, num_items_in_batch=num_items, extra_kwarg=1)
    assert seen[0].dtype == dtype and seen[0].data_ptr() == logits.data_ptr()  # no float32 copy
    (grad,) = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = stock(ref_logits, labels, vocab_size=300, num_items_in_batch=num_items)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)


def test_importing_xent_triton_does_not_import_transformers():
    code = ("import sys, xent_triton, xent_triton.integrations, xent_triton.integrations.torchtitan, "
            "xent_triton.integrations.torchtune; "
            "assert not {'transformers', 'trl', 'torchtitan', 'torchtune'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- Trainer: gradient accumulation over unequal-length sequences ------------------------------------------

TRAINER = [pytest.param("llama", "fused", id="llama-fused"),
           pytest.param("llama", "logits", id="llama-logits")]
if FULL:
    TRAINER += [pytest.param(a, p, id=f"{a}-{p}") for a in ("gemma2", "granite", "mixtral", "qwen2_moe")
                for p in PATHS]


@pytest.mark.parametrize("arch,path", TRAINER)
def test_trainer_gradient_accumulation_matches_stock(arch, path, tmp_path):
    from hf_trainer import train_log

    stock = train_log(tiny_model(arch), tmp_path / "stock")
    model = tiny_model(arch)
    if path == "fused":
        xhf.apply(model)
    else:
        xhf.patch_loss_functions()
    try:
        ours = train_log(model, tmp_path / "xent")
    finally:
        xhf.unpatch_loss_functions()
    assert len(ours) == len(stock) == 3
    for a, b in zip(ours, stock):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
