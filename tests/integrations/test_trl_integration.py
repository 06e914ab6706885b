"""xhf.add_fused_lm_head against TRL 1.16's own fused LM head, and TRL's trainers with xhf.patch_trl().

Both heads run on twin tiny models; every output field, the loss and every parameter gradient (of the
loss plus an entropy bonus) must agree in float32. The trainers run a few steps with the head patched;
spies prove that xent's op ran and TRL's own head did not.
"""
from __future__ import annotations

import pytest
import torch

import xent_triton
from hf_cases import FULL, VOCAB, assert_grads_close, batch, grads, tiny_model, tiny_tokenizer, twin
from xent_triton.integrations import transformers as xhf

ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _count(monkeypatch, owner, name: str) -> list:
    calls, fn = [], getattr(owner, name)

    def spy(*a, **k):
        calls.append(1)
        return fn(*a, **k)

    monkeypatch.setattr(owner, name, spy)
    return calls


@pytest.fixture
def trl_spies(monkeypatch):
    """(calls of xent's ops, calls of TRL's own chunked head)."""
    from trl.kernels import chunked_logprob

    from xent_triton.integrations import hf_trl

    xent = _count(monkeypatch, hf_trl, "one_pass")  # no softcap: one pass for every SFT / GRPO field
    xent_ce = _count(monkeypatch, xent_triton, "linear_cross_entropy")  # -CE per token under a softcap
    return (_Both(xent, xent_ce), _count(monkeypatch, chunked_logprob.ChunkedLogProbFunction, "apply"))


class _Both:
    def __init__(self, *lists):
        self.lists = lists

    def __bool__(self) -> bool:
        return any(self.lists)


HEADS = [  # arch, temperature, shift_labels, cast_lm_head_to_fp32
    pytest.param("llama", 1.0, False, False, id="llama"),
    pytest.param("gemma2", 0.7, False, False, id="gemma2-softcap-T0.7"),
    pytest.param("granite", 1.0, True, False, id="granite-scale-shift_labels"),
    pytest.param("mixtral", 1.0, False, True, id="mixtral-aux-fp32"),
]
if FULL:
    HEADS += [pytest.param("cohere", 0.5, False, False, id="cohere-scale-T0.5"),
              pytest.param("qwen2_moe", 1.0, True, False, id="qwen2_moe-aux-shift_labels"),
              pytest.param("gemma3", 1.0, True, True, id="gemma3-softcap-shift_labels-fp32")]


@pytest.mark.parametrize("arch,temperature,shift,fp32", HEADS)
def test_fused_head_matches_trl(arch, temperature, shift, fp32):
    from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head

    ref = tiny_model(arch)
    model = twin(ref)
    trl_add_fused_lm_head(ref, temperature=temperature, cast_lm_head_to_fp32=fp32, outputs=ALL_OUTPUTS)
    xhf.add_fused_lm_head(model, temperature=temperature, cast_lm_head_to_fp32=fp32, outputs=ALL_OUTPUTS)
    ids, mask, labels = batch()
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if shift:
        kw["shift_labels"] = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    kw["num_items_in_batch"] = torch.tensor(40)
    out, out_ref = model(**kw, fused_lm_head=True), ref(**kw, fused_lm_head=True)
    assert type(out).__name__ == "FusedCausalLMOutput"
    assert out.log_probs.shape == ((2, 16) if shift else (2, 15))
    for name in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "aux_loss"):
        a, b = getattr(out, name), getattr(out_ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")
    assert torch.equal(out.label_mask, out_ref.label_mask)
    assert torch.equal(out.is_top1, out_ref.is_top1)
    (out.loss - 0.1 * out.entropy.sum()).backward()
    (out_ref.loss - 0.1 * out_ref.entropy.sum()).backward()
    assert_grads_close(grads(model), grads(ref))
    # without fused_lm_head=True the forward is the stock one
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (2, 16, VOCAB)


def test_fully_masked_micro_batch_is_a_differentiable_zero():
    model = tiny_model("llama")
    xhf.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    ids, mask, _ = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.full_like(ids, -100), fused_lm_head=True,
                num_items_in_batch=torch.tensor(0))
    assert out.loss.item() == 0.0 and not out.label_mask.any()
    out.loss.backward()
    assert all(torch.count_nonzero(g) == 0 for g in grads(model).values() if g is not None)


def test_patch_trl_rebinds_and_restores():
    import trl.trainer.sft_trainer as sft
    import trl.trainer.utils as tu

    original = tu.add_fused_lm_head
    try:
        names = xhf.patch_trl()
        assert "trl.trainer.utils" in names and "trl.trainer.sft_trainer" in names
        assert tu.add_fused_lm_head is xhf.add_fused_lm_head is sft.add_fused_lm_head
    finally:
        xhf.unpatch_trl()
    assert tu.add_fused_lm_head is original and sft.add_fused_lm_head is original


def _texts(n: int = 16) -> list[str]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 20, (n,), generator=g)
    return [" ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (int(k),), generator=g)) for k in lengths]


def _sft_log(tmp_path, arch: str, bf16: bool) -> list[dict]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, logging_steps=1, report_to="none", use_cpu=True,
                     max_length=32, disable_tqdm=True, save_strategy="no", seed=0, learning_rate=1e-3,
                     bf16=bf16)
    data = Dataset.from_dict({"text": _texts()})
    trainer = SFTTrainer(model=tiny_model(arch), args=args, train_dataset=data,
                         processing_class=tiny_tokenizer())
    trainer.train()
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy")
    return [{k: h[k] for k in keys} for h in trainer.state.log_history if "loss" in h]


SFT = [pytest.param("llama", False, id="llama-fp32")]
if FULL:  # bf16 autocast (SFTConfig's default): TRL rounds its logits tiles to bf16, xent accumulates in fp32
    SFT += [pytest.param("gemma2", False, id="gemma2-fp32"), pytest.param("llama", True, id="llama-bf16")]


@pytest.mark.parametrize("arch,bf16", SFT)
def test_sft_trainer_with_patch_trl_matches_trl(arch, bf16, tmp_path, trl_spies):
    xent_calls, trl_calls = trl_spies
    stock = _sft_log(tmp_path / "trl", arch, bf16)
    assert trl_calls and not xent_calls
    trl_calls.clear()
    xhf.patch_trl()
    try:
        ours = _sft_log(tmp_path / "xent", arch, bf16)
    finally:
        xhf.unpatch_trl()
    assert xent_calls and not trl_calls  # xent's op ran, TRL's own head did not
    assert len(ours) == len(stock) == 2
    for a, b in zip(ours, stock):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=2e-2 if bf16 else 1e-5, abs=1e-6), k


def _length_reward(completions, **kwargs) -> list[float]:
    return [float(len(c)) for c in completions]


def test_grpo_trainer_runs_with_patch_trl(tmp_path, trl_spies):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    xent_calls, trl_calls = trl_spies
    xhf.patch_trl()
    try:
        args = GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                          num_generations=2, max_completion_length=4, logging_steps=1, report_to="none",
                          use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0, beta=0.0, bf16=False)
        prompts = Dataset.from_dict({"prompt": [" ".join(t.split()[:4]) for t in _texts(8)]})
        trainer = GRPOTrainer(model=tiny_model("qwen2"), reward_funcs=_length_reward, args=args,
                              train_dataset=prompts, processing_class=tiny_tokenizer())
        trainer.train()
    finally:
        xhf.unpatch_trl()
    assert xent_calls and not trl_calls
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def _rl_log(tmp_path, kind: str) -> list[dict]:
    """Two logged steps of TRL's GRPO or RLOO trainer on a tiny qwen2 (fp32, length reward)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config, trainer_cls = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (RLOOConfig, RLOOTrainer)
    args = config(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, num_generations=2,
                  max_completion_length=4, logging_steps=1, report_to="none", use_cpu=True,
                  disable_tqdm=True, save_strategy="no", seed=0, beta=0.0, bf16=False)
    prompts = Dataset.from_dict({"prompt": [" ".join(t.split()[:4]) for t in _texts(8)]})
    trainer = trainer_cls(model=tiny_model("qwen2"), reward_funcs=_length_reward, args=args,
                          train_dataset=prompts, processing_class=tiny_tokenizer())
    trainer.train()
    return [{k: v for k, v in h.items() if k in ("loss", "grad_norm", "entropy")}
            for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_rl_trainer_logs_match_trl(kind, tmp_path, trl_spies):
    """GRPO and RLOO through TRL 1.16's own trainers: loss, gradient norm and entropy of each logged
    step with patch_trl() equal TRL's own head on the same seeded run (fp32)."""
    xent_calls, trl_calls = trl_spies
    stock = _rl_log(tmp_path / "trl", kind)
    assert trl_calls and not xent_calls
    trl_calls.clear()
    xhf.patch_trl()
    try:
        ours = _rl_log(tmp_path / "xent", kind)
    finally:
        xhf.unpatch_trl()
    assert xent_calls and not trl_calls
    assert len(ours) == len(stock) == 2 and all("grad_norm" in h for h in ours)
    for a, b in zip(ours, stock):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
