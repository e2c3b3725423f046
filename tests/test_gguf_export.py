"""`hfllm export SRC OUT --to gguf`: read back by transformers and by hfllm's own `convert`, logits, quantization
error, tokenizer and chat template, Modelfile, refusals; SmolLM2 and llama.cpp itself in slow tests."""

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfllm.checkpoint import load
from hfllm.cli import main as cli_main
from hfllm.models.convert import convert, export

SAMPLE = "Now is the winter of our discontent\n\tmade glorious 1234 summer, café!"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 7 * 6?"}]


def tiny_hfllm(folder, tokenizer_dir, **overrides):
    """A random 2-layer hfllm model with `tokenizer_dir`'s tokenizer and config `overrides`, saved in `folder`."""
    from hfllm import HfllmForCausalLM, get_preset

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = get_preset("llama-tiny", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides)
    model = HfllmForCausalLM(config)
    with torch.no_grad():  # non-trivial norms and biases, so a lost or misplaced one changes the logits
        for name, parameter in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def logits(model, tokenizer, text=SAMPLE):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits[0]


def read_back(path):
    """The GGUF file at `path` through transformers' reader (dequantized to float32)."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


ARCHITECTURES = {  # hfllm config overrides -> the llama.cpp architecture they export to
    "llama": ({}, "llama"),
    "qwen2": (dict(attention_bias=True, attention_out_bias=False), "qwen2"),
    # transformers' qwen3 GGUF reader ignores attention.key_length and assumes Qwen3's head_dim 128
    "qwen3": (dict(qk_norm=True, head_dim=128), "qwen3"),
    # ... and its qwen3moe reader ignores expert_feed_forward_length (assumes 768)
    "qwen3moe": (dict(qk_norm=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=768), "qwen3moe"),
}


@pytest.mark.parametrize("quant", ["f32", "f16"])
@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_logits_match_after_read_back(kind, quant, tiny_llama_shakespeare_dir, tmp_path, single_thread):
    overrides, arch = ARCHITECTURES[kind]
    src = tiny_hfllm(tmp_path / "src", tiny_llama_shakespeare_dir, **overrides)
    path = export(src, tmp_path / "gguf", "gguf", quant)
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == arch
    source, tokenizer = load(src, dtype=torch.float32)
    expected = logits(source, tokenizer)
    native, native_tokenizer = read_back(path)
    assert torch.allclose(logits(native, native_tokenizer), expected, atol=1e-3, rtol=0)
    hfllm_model, _ = load(convert(path, tmp_path / "hfllm"), dtype=torch.float32)  # hfllm's own reader
    assert type(hfllm_model).__name__ == "HfllmForCausalLM"
    assert torch.allclose(logits(hfllm_model, tokenizer), expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("quant, bound", [("q8_0", 1 / 254), ("q4_0", 1 / 8), ("bf16", 1 / 256)])
def test_quantized_weights_within_the_format_error(quant, bound, tiny_hfllm_shakespeare_dir, tmp_path):
    """Each 32-value block dequantizes within the format's step of its maximum: q8_0 half a step (max/127/2), q4_0
    a full step max/8 (levels -8..7, so the side opposite the maximum clips), bf16 8 significant bits; up to the
    float16 rounding of the block scale. Norms stay float32."""
    from hfllm.models.convert import to_native
    from hfllm.models.gguf_export import QUANTS, gguf_tensors

    path = export(tiny_hfllm_shakespeare_dir, tmp_path / "gguf", "gguf", quant)
    source, _ = load(tiny_hfllm_shakespeare_dir, dtype=torch.float32)
    expected = gguf_tensors(to_native(source), gguf.MODEL_ARCH.LLAMA)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert tensors.keys() == expected.keys()
    for name, tensor in tensors.items():
        original = expected[name]
        if original.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(tensor.data, original)
            continue
        assert tensor.tensor_type == QUANTS[quant][0], name
        restored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(original.shape)
        blocks, restored_blocks = original.reshape(-1, 32), restored.reshape(-1, 32)
        block_max = np.abs(blocks).max(axis=1, keepdims=True)
        error = np.abs(restored_blocks - blocks)
        slack = 1.15  # the block scale itself is stored in float16
        assert (error <= block_max * bound * slack + 1e-7).all(), f"{name}: {(error - block_max * bound).max()}"
        assert error.max() > 0  # really quantized


def test_tiny_gguf_round_trips_through_hfllm(tiny_llama_shakespeare_gguf, tmp_path, single_thread):
    """GGUF (written as llama.cpp's converter does) -> hfllm convert -> export --to gguf: the same tensors bit for
    bit, the same tokens, types and merges."""
    hfllm_dir = convert(tiny_llama_shakespeare_gguf, tmp_path / "hfllm", dtype="float32")
    path = export(hfllm_dir, tmp_path / "gguf", "gguf", "f32")
    original, exported = gguf.GGUFReader(tiny_llama_shakespeare_gguf), gguf.GGUFReader(path)
    before, after = ({t.name: t for t in reader.tensors} for reader in (original, exported))
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].tensor_type == tensor.tensor_type
        np.testing.assert_array_equal(after[name].data, tensor.data, err_msg=name)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "llama.rope.dimension_count"):
        assert exported.fields[key].contents() == original.fields[key].contents(), key


def test_tokenizer_and_chat_template_survive(tiny_llama_chat_dir, tmp_path):
    """ChatML tokenizer (SmolLM2's original template): the same ids for text and for the rendered chat, the
    template itself in the file, specials marked as control tokens; the Modelfile speaks the same ChatML."""
    hfllm_dir = convert(tiny_llama_chat_dir, tmp_path / "hfllm")
    path = export(hfllm_dir, tmp_path / "gguf", "gguf", "q8_0")
    source = AutoTokenizer.from_pretrained(tiny_llama_chat_dir)
    _, restored = read_back(path)
    assert restored(SAMPLE).input_ids == source(SAMPLE).input_ids
    for messages in (CHAT, CHAT[1:]):
        rendered = source.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert restored.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered
        assert restored(rendered, add_special_tokens=False).input_ids == source(rendered, add_special_tokens=False).input_ids
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.chat_template"].contents() == source.chat_template
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[source.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.eos_token_id"].contents() == source.eos_token_id

    modelfile = (path.parent / "Modelfile").read_text()
    assert modelfile.splitlines()[0] == f"FROM ./{path.name}"
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    assert "{{ range .Messages }}" in modelfile.replace("{{-", "{{") and "<|im_start|>{{ .Role }}" in modelfile


def test_moe_exports_as_llama_experts(tiny_hfllm_chat_dir, tmp_path):
    """MoE without qk_norm -> Mixtral -> llama.cpp's `llama` with experts: fused gate_up split in llama.cpp's order."""
    source, _ = load(tiny_hfllm_chat_dir, dtype=torch.float32)
    if not source.config.num_experts:
        pytest.skip("dense parametrization")
    path = export(tiny_hfllm_chat_dir, tmp_path / "gguf", "gguf", "f32")
    reader = gguf.GGUFReader(path)
    assert reader.fields["llama.expert_count"].contents() == 4
    assert reader.fields["llama.expert_used_count"].contents() == 2
    tensors = {t.name: t.data for t in reader.tensors}
    gate_up = source.model.layers[1].mlp.experts.gate_up_proj.detach().numpy()  # (E, 2I, H)
    np.testing.assert_array_equal(tensors["blk.1.ffn_gate_exps.weight"], gate_up[:, :32])
    np.testing.assert_array_equal(tensors["blk.1.ffn_up_exps.weight"], gate_up[:, 32:])
    assert tensors["blk.1.ffn_down_exps.weight"].shape == (4, 64, 32)
    assert tensors["blk.1.ffn_gate_inp.weight"].shape == (4, 64)


@pytest.mark.parametrize("overrides, args, message", [
    (dict(sliding_window=16, layer_types=["sliding_attention"] * 2), [], "needs a sliding window"),
    (dict(qk_norm=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[0]), [],
     "dense layers [0]"),
    (dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)), [], "rope scaling"),
    ({}, ["--quant", "q3_k"], "--quant q3_k needs --to gguf"),
    ({}, ["--quant", "q8_0", "--to", "transformers"], "--quant q8_0 needs --to gguf"),
])
def test_refusals(overrides, args, message, tiny_llama_shakespeare_dir, tmp_path, capsys):
    src = tiny_hfllm(tmp_path / "src", tiny_llama_shakespeare_dir, **overrides)
    out = tmp_path / "out"
    argv = ["export", str(src), str(out), *(args if "--to" in args else ["--to", "gguf", *args])]
    assert cli_main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_refuses_a_tokenizer_llama_cpp_cannot_run(tiny_llama_shakespeare_dir, tmp_path):
    """A character-level tokenizer (per-character split, no byte-level BPE) has no llama.cpp equivalent."""
    from hfllm.data.tokenizer import train_tokenizer
    from hfllm.errors import HfllmError

    src = tiny_hfllm(tmp_path / "src", tiny_llama_shakespeare_dir)
    char = train_tokenizer("char", [SAMPLE], 300)
    char.save_pretrained(src)  # config vocab 300 >= the char vocab
    with pytest.raises(HfllmError, match="only byte-level BPE"):
        export(src, tmp_path / "out", "gguf", "f16")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- SmolLM2 and llama.cpp (slow)


@pytest.mark.slow
def test_smollm2_round_trips(smollm2_hfllm_dir, tmp_path):
    """SmolLM2 -> GGUF f16 -> hfllm -> GGUF f16: identical tensors and tokenizer; the chat renders and tokenizes as
    the source; logits within f16 rounding of the float32 source."""
    first = export(smollm2_hfllm_dir, tmp_path / "first", "gguf", "f16")
    second = export(convert(first, tmp_path / "hfllm", dtype="float32"), tmp_path / "second", "gguf", "f16")
    a, b = gguf.GGUFReader(first), gguf.GGUFReader(second)
    for before, after in zip(a.tensors, b.tensors, strict=True):
        assert before.name == after.name
        np.testing.assert_array_equal(after.data, before.data, err_msg=before.name)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert a.fields[key].contents() == b.fields[key].contents()
    source, tokenizer = load(smollm2_hfllm_dir, dtype=torch.float32)
    native, restored = read_back(first)
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert restored.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == rendered
    assert restored(rendered).input_ids == tokenizer(rendered).input_ids
    rounded = source.half().float()  # the function the f16 file holds
    assert torch.allclose(logits(native, restored, rendered), logits(rounded, tokenizer, rendered), atol=1e-3, rtol=0)


@pytest.fixture(scope="module")
def llama_cpp():
    """The `llama_cpp` module (llama-cpp-python, built from PyPI's source archive once); skipped only if it cannot be
    built here."""
    from hfllm.assets import llama_cpp
    from hfllm.errors import HfllmError

    try:
        return llama_cpp()
    except HfllmError as error:
        pytest.skip(f"llama.cpp (llama-cpp-python) could not be built: {error}")


def llama_cpp_greedy(llama, ids: list[int], count: int) -> list[int]:
    """llama.cpp's greedy continuation of the token ids `ids`: `count` tokens, or up to its end-of-text token."""
    generated = []
    for token in llama.generate(ids, temp=0.0, top_k=1):
        generated.append(token)
        if len(generated) == count or token == llama.token_eos():
            return generated


GREEDY_PROMPTS = [  # (prompt, chat, system): a raw completion and two chat turns (default and own system prompt)
    ("The old lighthouse keeper counted the ships until", False, None),
    ("Name three colours.", True, None),
    ("What is 2 + 3?", True, "Be brief."),
]


@pytest.mark.slow
def test_llama_cpp_runs_the_smollm2_export_like_hfllm(llama_cpp, smollm2_hfllm_dir, tmp_path, single_thread):
    """llama.cpp loads the f16 export and, on the same ids, greedy-decodes the same 32 token ids as `hfllm generate`
    on the f16-rounded weights; it tokenizes the prompts (BOS by the file's add_bos) and renders the chat with the
    file's template to the same ids and text."""
    from hfllm.inference.generate import complete
    from hfllm.inference.options import Decoding

    path = export(smollm2_hfllm_dir, tmp_path / "gguf", "gguf", "f16")
    llama = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False)
    model, tokenizer = load(smollm2_hfllm_dir, dtype=torch.float32)
    model.half().float()  # the function the f16 file holds
    assert llama.tokenize(SAMPLE.encode(), add_bos=True, special=True) == tokenizer(SAMPLE).input_ids
    for prompt, chat, system in GREEDY_PROMPTS:
        (expected,) = complete(model, tokenizer, [prompt], Decoding(max_new_tokens=32), chat=chat, system=system)
        ids = tokenizer(expected.rendered_prompt, add_special_tokens=not chat).input_ids
        assert llama.tokenize(expected.rendered_prompt.encode(), add_bos=not chat, special=True) == ids
        assert llama_cpp_greedy(llama, ids, 32) == expected.completion_token_ids, prompt
        if chat:  # llama-cpp-python renders the chat with the template stored in the file
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            answer = llama.create_chat_completion(messages, max_tokens=32, temperature=0.0, top_k=1)
            assert answer["choices"][0]["message"]["content"] == expected.text, prompt
    llama.close()
