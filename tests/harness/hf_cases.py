"""Tiny random-init transformers models and batches for the HF / TRL integration tests (no download).

``ARCHS`` maps an id to (model_type, config overrides); every config has hidden size 64, 2 layers and
a vocabulary of ``VOCAB``. Set ``XENT_HF_ALL=1`` (``python -m perf.hf_check`` does) to run the whole
architecture x case matrix instead of the CI subset.
"""
from __future__ import annotations

import copy
import os
from unittest import mock

import torch

VOCAB = 2000
FULL = os.environ.get("XENT_HF_ALL", "0") == "1"

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1)
ARCHS = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=16)),
    # a small softcap so that it changes the loss noticeably at these logit sizes
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=16, final_logit_softcapping=2.0)),
    "gemma3": ("gemma3_text", dict(head_dim=16, query_pre_attn_scalar=16, final_logit_softcapping=2.0)),
    "granite": ("granite", dict(logits_scaling=4.0)),
    "cohere": ("cohere", dict(logit_scale=0.5)),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "mixtral": ("mixtral", dict(num_local_experts=4, **MOE)),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, moe_intermediate_size=64,
                                    shared_expert_intermediate_size=64, decoder_sparse_step=1, **MOE)),
}


def tiny_model(arch: str, seed: int = 0, **overrides):
    """A float32 random-init causal LM of ``ARCHS[arch]`` (training mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    model_type, extra = ARCHS[arch]
    config = AutoConfig.for_model(model_type, **{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float().train()


def twin(model):
    """An independent copy (same weights, own gradients; tied weights stay tied)."""
    return copy.deepcopy(model)


def batch(B: int = 2, T: int = 16, seed: int = 1, pad: int = 6, prompt: int = 3):
    """input_ids (B, T), attention_mask with the last ``pad`` positions of row 0 padded, labels -100 on
    padding and on the first ``prompt`` positions of every row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        mask[0, T - pad:] = 0
        ids[0, T - pad:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return ids, mask, labels


def grads(model) -> dict:
    """name -> gradient (None when the parameter got none)."""
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def assert_grads_close(ours: dict, ref: dict, rtol: float = 2e-5, atol_frac: float = 2e-5) -> None:
    """Every parameter gradient equal to the reference's within fp32 tolerance (absolute part scaled
    to the largest reference gradient); the same parameters get a gradient."""
    assert ours.keys() == ref.keys()
    scale = max((g.abs().max().item() for g in ref.values() if g is not None), default=1.0)
    for name in ref:
        a, b = ours[name], ref[name]
        assert (a is None) == (b is None), f"{name}: gradient presence differs"
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol_frac * scale, msg=lambda m: f"{name}: {m}")


def tiny_tokenizer(vocab: int = VOCAB):
    """A word-level fast tokenizer of ``vocab`` tokens "<pad>", "<bos>", "<eos>", "w3", ... (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<pad>")


class LogitRows:
    """Counts the rows of every ``torch.mm`` / ``torch.addmm`` output with C columns while entered (the
    vendor GEMMs that form logits: a pass over the vocabulary covers N rows)."""

    def __init__(self, C: int):
        self.C, self.rows = C, 0

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            if out.dim() == 2 and out.shape[-1] == self.C:
                self.rows += out.shape[0]
            return out
        return counted

    def __enter__(self):
        self._patches = [mock.patch.object(torch, n, self._wrap(getattr(torch, n))) for n in ("mm", "addmm")]
        for p in self._patches:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in self._patches:
            p.stop()
