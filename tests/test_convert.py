"""Conversion in and out of native transformers architectures: identical logits, exact round trips, clear errors."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from hfllm import HfllmForCausalLM, get_preset
from hfllm.models.convert import native_config_from, to_hfllm, to_native
from hfllm.cli import main
from hfllm.errors import HfllmError

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
NATIVE_CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 32}),
    "llama-bias-tied": lambda: LlamaConfig(**{**SMALL, "tie_word_embeddings": True}, attention_bias=True, mlp_bias=True),
    "mistral": lambda: MistralConfig(**SMALL, sliding_window=6),
    "qwen2-mixed-window": lambda: Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=24, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                                         "factor": 4.0,
                                                                         "original_max_position_embeddings": 32}),
    "mixtral": lambda: MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
    "qwen3-moe": lambda: Qwen3MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                        decoder_sparse_step=2, norm_topk_prob=False),
}


def _random_native(name: str):
    torch.manual_seed(0)
    config = NATIVE_CONFIGS[name]()
    config.architectures = [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a dropped tensor shows in the logits
        for name_, param in model.named_parameters():
            if "norm" in name_ or name_.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def _batch():
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("name", list(NATIVE_CONFIGS))
def test_native_to_hfllm_same_logits_and_exact_round_trip(name):
    native = _random_native(name)
    hfllm_model = to_hfllm(native).eval()
    ids, mask = _batch()
    with torch.no_grad():
        expected = native(ids, attention_mask=mask).logits
        got = hfllm_model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got - expected)[real].abs().max().item() < 1e-5

    back = to_native(hfllm_model)
    assert type(back) is type(native)
    native_state, back_state = native.state_dict(), back.state_dict()
    assert native_state.keys() == back_state.keys()
    for key in native_state:
        assert torch.equal(native_state[key], back_state[key]), key


def test_preset_exports_to_expected_architecture():
    expected = {"llama-tiny": "LlamaConfig", "mistral-tiny": "MistralConfig", "moe-tiny": "MixtralConfig"}
    for preset, config_name in expected.items():
        assert type(native_config_from(get_preset(preset))).__name__ == config_name
    assert type(native_config_from(get_preset("llama-tiny", qk_norm=True))).__name__ == "Qwen3Config"


def test_export_refusals_name_the_reason():
    with pytest.raises(HfllmError, match=r"shared experts \(num_shared_experts > 0\)"):
        native_config_from(get_preset("moe-tiny", num_shared_experts=1))
    with pytest.raises(HfllmError, match="output projection alone"):
        native_config_from(get_preset("llama-tiny", attention_out_bias=True))
    model = HfllmForCausalLM(get_preset("moe-tiny", vocab_size=64))
    model.routers()[0].expert_bias[0] = 0.5
    with pytest.raises(HfllmError, match="aux-loss-free routing biases"):
        to_native(model)


def test_cli_convert_export_round_trip(tmp_path, capsys):
    native = _random_native("mistral")
    src = tmp_path / "native"
    native.save_pretrained(src)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)} | {"<unk>": 96}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(src)

    run = lambda *args: subprocess.run([sys.executable, "-m", "hfllm", *args], capture_output=True, text=True)
    result = run("convert", str(src), str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "hfllm" and config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_hfllm")
    assert (tmp_path / "hf" / "tokenizer.json").exists()

    result = run("export", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "transformers")
    assert result.returncode == 0, result.stderr
    assert "MistralForCausalLM checkpoint written" in result.stdout
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back")  # no remote code needed
    assert type(back).__name__ == "MistralForCausalLM"
    for key, value in native.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key

    # bad input: one line, exit 2, no traceback, nothing written
    capsys.readouterr()  # progress bars of the saves above
    for args, message in [  # in this process: the two runs above proved the command end to end
        (("convert", str(tmp_path / "nope"), str(tmp_path / "x")), f"source '{tmp_path / 'nope'}' does not exist"),
        (("convert", str(src), str(tmp_path / "hf")), f"output folder '{tmp_path / 'hf'}' is not empty"),
        (("export", str(src), str(tmp_path / "y")), "is not an hfllm checkpoint"),
    ]:
        assert main(list(args)) == 2
        out, err = capsys.readouterr()
        assert message in err and "Traceback" not in err + out
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_convert_refuses_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    from hfllm.models.convert import convert

    with pytest.raises(HfllmError, match="cannot convert architecture 'GPT2LMHeadModel'.*supported: LlamaForCausalLM"):
        convert(tmp_path, tmp_path / "out")


def _gguf_with_garbage_header(path):
    """The right magic and version, then counts and key/value bytes that mean nothing (gguf-py: IndexError)."""
    import random
    import struct

    rng = random.Random(0)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2, 3) + bytes(rng.getrandbits(8) for _ in range(200)))


def _gguf_without_tensors(path):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("make, problem", [
    (_gguf_with_garbage_header, "is truncated or corrupt (index 0 is out of bounds"),
    (_gguf_without_tensors, "is truncated or corrupt (no tensors)"),  # transformers would build a default 7B model
    (lambda path: path.write_bytes(b"GGUF\x03\x00\x00\x00"), "is truncated or corrupt"),
    (lambda path: path.write_bytes(b"GGXF" + bytes(40)), "is not a GGUF file"),
])
def test_convert_of_a_corrupt_gguf_is_one_line(tmp_path, capsys, make, problem):
    from hfllm.cli import main

    make(tmp_path / "model.gguf")
    assert main(["convert", str(tmp_path / "model.gguf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hfllm convert: error: ") and err.count("\n") == 1 and problem in err, err
    assert not (tmp_path / "out").exists()
