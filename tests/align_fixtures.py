"""Shared fixtures for the adaptation tests: a tiny random Llama with SmolLM2's tokenizer, synth data, SmolLM2.

Import the fixtures into a test module with `from align_fixtures import tiny_model_dir, synth_dir  # noqa: F401`.
"""

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hfllm.assets import cache_dir, smollm2_gguf


def smollm2_tokenizer():
    """SmolLM2's real tokenizer (49152 tokens, ChatML), loaded from the GGUF once and cached as a folder."""
    folder = cache_dir() / "smollm2-135m-instruct-tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        gguf = smollm2_gguf()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama (hidden 64) saved with SmolLM2's tokenizer: trains in well under a second a step."""
    tokenizer = smollm2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from hfllm.synth import synth_main

    folder = tmp_path_factory.mktemp("synth")
    synth_main(["arithmetic", "--out", str(folder), "--n-train", "32", "--n-test", "8"], prog="hfllm data synth")
    return folder


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a float32 transformers checkpoint in the hfllm cache (converted once, ~20 s)."""
    from hfllm.adapters import smollm2_instruct_dir

    return smollm2_instruct_dir()
