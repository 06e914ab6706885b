"""The TRL fused head's fields from one pass over the vocabulary (issue 19 item 4), on both CPU paths.

``per_token`` without a softcap takes log-probs, entropy, lse and ``is_top1`` from the one forward
pass of the op behind ``xent_triton.linear_token_logprobs``; checked against float64 torch with the
one tolerance rule, and the passes counted as the rows of (rows, C) logits GEMMs the forward runs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_cases import LogitRows
from tolerances import assert_close_rule
from xent_triton.integrations.hf_trl import per_token

PATHS = [pytest.param("1", id="triton"), pytest.param("0", id="torch")]
SFT = ("log_probs", "entropy", "is_top1")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", request.param)
    return request.param


def _inputs(N, D, C, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(C, D, generator=g) * (2.0 / D ** 0.5)
    b = torch.randn(C, generator=g) * 0.5 if bias else None
    y = torch.randint(0, C, (N,), generator=g)
    y[::5] = (F.linear(h, w, b) / 1.0).argmax(-1)[::5]  # some targets are the argmax: is_top1 both ways
    return h, w, b, y


def _fields(h, w, b, y, T, dtype):
    """(log_probs, entropy, log_sum_sq_probs, is_top1) by composing torch ops in ``dtype``."""
    z = F.linear(h.to(dtype), w.to(dtype), None if b is None else b.to(dtype)) / T
    lq = torch.log_softmax(z, -1)
    ent = -(lq.exp() * lq).sum(-1)
    return lq.gather(1, y[:, None])[:, 0], ent, torch.logsumexp(2 * lq, -1), z.argmax(-1) == y


CASES = [  # N, D, C, temperature, bias
    pytest.param(37, 24, 1000, 1.0, True, id="N37-D24-C1000-bias"),
    pytest.param(23, 16, 3001, 0.7, False, id="N23-D16-C3001-T0.7"),
]


@pytest.mark.parametrize("N,D,C,T,bias", CASES)
def test_one_pass_fields_and_gradients_match_float64(N, D, C, T, bias, path):
    h, w, b, y = _inputs(N, D, C, bias)
    g = torch.Generator().manual_seed(3)
    up_lp, up_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)  # upstream != 1
    outs, grads = {}, {}
    for name, dtype in (("ours", torch.float32), ("torch", torch.float32), ("ref", torch.float64)):
        leaves = [t.clone().to(dtype).requires_grad_() for t in (h, w) + ((b,) if bias else ())]
        hh, ww, bb = leaves[0], leaves[1], (leaves[2] if bias else None)
        if name == "ours":
            with LogitRows(C) as counter:
                lp, ent, _, _, top1 = per_token(hh, ww, bb, y, T, None, 1.0, SFT)
            assert counter.rows == N  # one pass (vendor GEMMs) for log_probs, entropy and is_top1
            with torch.no_grad():
                sq = per_token(hh, ww, bb, y, T, None, 1.0, ("log_probs", "log_sum_sq_probs"))[2]
        else:
            lp, ent, sq, top1 = _fields(hh, ww, bb, y, T, dtype)
        (lp * up_lp.to(dtype) + ent * up_ent.to(dtype)).sum().backward()
        outs[name] = (lp, ent, sq, top1)
        grads[name] = [t.grad for t in leaves]
    for i, field in enumerate(("log_probs", "entropy", "log_sum_sq_probs")):
        assert_close_rule(field, outs["ours"][i], outs["torch"][i], outs["ref"][i], torch.float32)
    for field, ours, theirs, ref in zip(("grad_hidden", "grad_weight", "grad_bias"), *grads.values()):
        assert_close_rule(field, ours, theirs, ref, torch.float32)
    assert torch.equal(outs["ours"][3], outs["ref"][3]) and 0 < int(outs["ref"][3].sum()) < N


def test_sft_head_takes_one_pass_over_the_vocabulary(path):
    """TRL's SFTTrainer asks for (log_probs, entropy, is_top1): one (rows, V) GEMM pass in the forward."""
    from hf_cases import VOCAB, batch, tiny_model
    from xent_triton.integrations import transformers as xhf

    model = tiny_model("llama")
    xhf.add_fused_lm_head(model, outputs=SFT)
    ids, mask, labels = batch()
    counter = LogitRows(VOCAB)
    with torch.no_grad(), counter:
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    n_valid = int(out.label_mask.sum())
    assert counter.rows == n_valid > 0
    assert out.is_top1.dtype == torch.bool and out.entropy is not None


def _capped_fields(h, w, b, y, T, softcap, scale, dtype):
    """(log_probs, entropy, is_top1) of z = softcap tanh(scale x / softcap) / T composed in ``dtype``."""
    x = F.linear(h.to(dtype), w.to(dtype), None if b is None else b.to(dtype))
    z = softcap * torch.tanh(scale * x / softcap) / T
    lq = torch.log_softmax(z, -1)
    return lq.gather(1, y[:, None])[:, 0], -(lq.exp() * lq).sum(-1), z.argmax(-1) == y


CAPPED = [  # N, D, C, temperature, softcap, logit_scale, bias
    pytest.param(29, 16, 1500, 0.7, 3.0, 1.0, False, id="gemma-T0.7-cap3"),
    pytest.param(21, 24, 999, 1.3, 2.0, 0.6, True, id="cap2-scale0.6-bias"),
]


@pytest.mark.parametrize("N,D,C,T,softcap,scale,bias", CAPPED)
def test_softcap_head_takes_the_logprob_pass(N, D, C, T, softcap, scale, bias, path):
    """A softcap (Gemma): log-probs, entropy and is_top1 from the log-prob head's own softcap in one pass
    (before: -CE per token, the entropy in checkpointed tiles and an argmax pass: three)."""
    h, w, b, y = _inputs(N, D, C, bias)
    g = torch.Generator().manual_seed(4)
    up_lp, up_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    outs, grads = {}, {}
    for name, dtype in (("ours", torch.float32), ("torch", torch.float32), ("ref", torch.float64)):
        leaves = [t.clone().to(dtype).requires_grad_() for t in (h, w) + ((b,) if bias else ())]
        hh, ww, bb = leaves[0], leaves[1], (leaves[2] if bias else None)
        if name == "ours":
            with LogitRows(C) as counter:
                lp, ent, _, _, top1 = per_token(hh, ww, bb, y, T, softcap, scale, SFT)
            assert counter.rows == N
        else:
            lp, ent, top1 = _capped_fields(hh, ww, bb, y, T, softcap, scale, dtype)
        (lp * up_lp.to(dtype) + ent * up_ent.to(dtype)).sum().backward()
        outs[name], grads[name] = (lp, ent, top1), [t.grad for t in leaves]
    for i, field in enumerate(("log_probs", "entropy")):
        assert_close_rule(field, outs["ours"][i], outs["torch"][i], outs["ref"][i], torch.float32)
    for field, ours, theirs, ref in zip(("grad_hidden", "grad_weight", "grad_bias"), *grads.values()):
        assert_close_rule(field, ours, theirs, ref, torch.float32)
    assert torch.equal(outs["ours"][2], outs["ref"][2])
