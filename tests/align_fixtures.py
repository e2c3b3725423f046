"""Shared fixtures for the adaptation tests: tiny random Llama and hfllm models with a tiny
ChatML BPE, synth data, SmolLM2.

Import the fixtures into a test module with `from align_fixtures import tiny_model_dir, synth_dir  # noqa: F401`.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_tokenizer():
    """A 400-token byte-level BPE with ChatML specials, trained on synthetic chats in a fraction of a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hfllm.data.synth import synthesize

    texts = []
    for task in ("arithmetic", "reverse", "units"):
        for row in synthesize(task, 200, 10, seed=1)["sft"]:
            texts += [m["role"] + "\n" + m["content"] for m in row["messages"]]
    texts.append("system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>",
        chat_template=SMOLLM2_ORIGINAL_TEMPLATE,
    )


# SmolLM2-135M-Instruct's own template (no generation markers), as shipped in its GGUF
SMOLLM2_ORIGINAL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
    "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama (hidden 64) with a 400-token tokenizer: a training step takes milliseconds."""
    tokenizer = tiny_tokenizer()
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
    from hfllm.data.synth import synth_main

    folder = tmp_path_factory.mktemp("synth")
    synth_main(["arithmetic", "--out", str(folder), "--n-train", "32", "--n-test", "8"], prog="hfllm data synth")
    return folder


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct converted with `hfllm convert` from the GGUF file, cached (first time ~40 s)."""
    from hfllm.assets import smollm2_hfllm_dir

    return smollm2_hfllm_dir()


@pytest.fixture(scope="session", params=["hfllm-dense", "hfllm-moe"])
def tiny_hfllm_dir(request, tmp_path_factory):
    """hfllm's own family (dense, then MoE with aux losses on), same size and tokenizer as `tiny_model_dir`."""
    from hfllm import HfllmForCausalLM, get_preset

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, output_router_logits=True)
    config = get_preset(
        "llama-tiny", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **(moe if request.param == "hfllm-moe" else {}),
    )
    folder = tmp_path_factory.mktemp(request.param)
    HfllmForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
