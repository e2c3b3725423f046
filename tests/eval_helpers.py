"""Fixtures for the evaluation tests: a tiny random Llama with a small BPE tokenizer, SmolLM2 converted once.

Import into a test module with `from eval_helpers import single_thread, tiny_model_dir, smollm2_dir  # noqa: F401`.
The SmolLM2 folders are built once into hfllm's cache (`hfllm.assets`), so later sessions reuse them.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run fastest on one thread, above all on a shared machine; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama (hidden 64, 512 positions) with a 300-token BPE trained on held-out Shakespeare."""
    from hfllm.data.tokenizer import train_tokenizer
    from hfllm.evaluation.tasks import shakespeare_passages

    tokenizer = train_tokenizer("bpe", shakespeare_passages()[:40], 300)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_hfllm_dir(tiny_model_dir, tmp_path_factory):
    """A random 2-layer model of hfllm's own family with the same tokenizer, saved with `save_pretrained`."""
    from transformers import AutoTokenizer

    from hfllm import HfllmForCausalLM, get_preset

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    config = get_preset(
        "llama-tiny", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-hfllm")
    HfllmForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a float32 transformers folder (hfllm.assets converts the GGUF once into the cache)."""
    from hfllm.assets import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="session")
def smollm2_hfllm_dir():
    """The same model converted to hfllm's own family with `hfllm convert` (cached by hfllm.assets)."""
    from hfllm.assets import smollm2_hfllm_dir

    return smollm2_hfllm_dir()
