"""Quantized inference: `--load_in_4bit` / `--load_in_8bit` (bitsandbytes, on the CPU here) for generate, chat and
eval. The layers are bitsandbytes' with the asked-for options, the outputs stay close to float32, bad combinations
are one line, and the flags reach `hfllm eval`'s model.
"""

import json

import pytest
import torch

from hfllm.checkpoint import load, quantization_config
from hfllm.cli import main as cli
from hfllm.errors import HfllmError
from hfllm.inference.options import Parser, add_model_arguments, load_for_inference, quantization_from_args

bnb = pytest.importorskip("bitsandbytes")


def model_args(*flags: str):
    parser = Parser(prog="test")
    add_model_arguments(parser)
    return parser.parse_args(["MODEL", *flags])


def quantized_linears(model) -> list:
    return [module for module in model.modules() if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


@pytest.fixture(scope="module")
def float_logits(tiny_llama_chat_dir):
    model, tokenizer = load(tiny_llama_chat_dir)
    inputs = tokenizer(["What is 3 + 4? Tell me now", "reverse the word cat"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return inputs, model(**inputs).logits  # (B, T, V)


@pytest.mark.parametrize("flags, kind, max_error", [
    (["--load_in_8bit"], "Linear8bitLt", 0.05),
    (["--load_in_4bit"], "Linear4bit", 0.3),
])
def test_quantized_model_is_bitsandbytes_and_close_to_float(tiny_llama_chat_dir, float_logits, flags, kind, max_error,
                                                            single_thread):
    model, tokenizer = load_for_inference(str(tiny_llama_chat_dir), "auto", quantization_from_args(model_args(*flags)))
    linears = quantized_linears(model)
    assert {type(module).__name__ for module in linears} == {kind}
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers; lm_head stays float
    inputs, reference = float_logits
    with torch.no_grad():
        logits = model(**inputs).logits
    error = (logits - reference).abs().max().item()
    assert 0 < error < max_error * reference.abs().max().item()  # quantized (not the float weights), but close
    mask = inputs["attention_mask"].bool()
    agree = (logits.argmax(-1) == reference.argmax(-1))[mask].float().mean().item()
    assert agree >= 0.9


def test_4bit_options_reach_the_layers(tiny_llama_chat_dir, single_thread):
    args = model_args("--load_in_4bit", "--bnb_4bit_quant_type", "fp4", "--bnb_4bit_use_double_quant",
                      "--bnb_4bit_compute_dtype", "bfloat16")
    model, _ = load_for_inference(str(tiny_llama_chat_dir), "auto", quantization_from_args(args))
    layer = quantized_linears(model)[0]
    assert layer.weight.quant_state.quant_type == "fp4"
    assert layer.weight.quant_state.nested  # double quantization: the scales are quantized too
    assert layer.compute_dtype == torch.bfloat16
    default = quantization_config(load_in_4bit=True)
    assert (default.bnb_4bit_quant_type, default.bnb_4bit_use_double_quant, default.bnb_4bit_compute_dtype) == (
        "nf4", False, torch.float32)
    assert quantization_config(load_in_4bit=True, dtype="bfloat16").bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_generate_and_chat_run_quantized(tiny_llama_chat_dir, flag, capsys, monkeypatch, single_thread):
    code = cli(["generate", str(tiny_llama_chat_dir), flag, "--prompt", "What is 3 + 4?", "--max_new_tokens", "8",
                "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["completion_tokens"] == 8

    import io
    import sys
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert cli(["chat", str(tiny_llama_chat_dir), flag, "--max_new_tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("flags, message", [
    (["--load_in_4bit", "--load_in_8bit"], "--load_in_4bit and --load_in_8bit exclude each other; choose one"),
    (["--bnb_4bit_quant_type", "fp4"], "--bnb_4bit_quant_type applies to 4-bit loading; add --load_in_4bit or drop it"),
    (["--load_in_8bit", "--bnb_4bit_use_double_quant"],
     "--bnb_4bit_use_double_quant applies to 4-bit loading; add --load_in_4bit or drop it"),
])
def test_bad_combinations_are_one_line(tiny_llama_chat_dir, flags, message, capsys):
    for command in (["generate", str(tiny_llama_chat_dir), "--prompt", "hi"], ["chat", str(tiny_llama_chat_dir)],
                    ["eval", str(tiny_llama_chat_dir), "--tasks", "hfllm_shakespeare_ppl"]):
        assert cli([*command, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(message) and "\n" not in err, err


def test_gguf_with_bitsandbytes_is_refused(tiny_llama_shakespeare_gguf):
    with pytest.raises(HfllmError, match="is a GGUF file .* bitsandbytes cannot quantize it again"):
        load_for_inference(str(tiny_llama_shakespeare_gguf), "auto", quantization_config(load_in_4bit=True))


def test_eval_loads_the_model_quantized(tiny_llama_shakespeare_dir, tmp_path, single_thread):
    """The flags reach `hfllm eval`'s model: bits per byte moves a little from float32's, and the report says so."""
    results = {}
    for name, flags in (("float", []), ("int8", ["--load_in_8bit"]), ("nf4", ["--load_in_4bit"])):
        assert cli(["eval", str(tiny_llama_shakespeare_dir), "--tasks", "hfllm_shakespeare_ppl", "--limit", "1",
                    "--output_path", str(tmp_path / name), *flags]) == 0
        (run,) = json.loads((tmp_path / name / "results.json").read_text())["models"]
        results[name] = run
    assert [results[name]["quantization"] for name in ("float", "int8", "nf4")] == [None, "8bit", "4bit-nf4"]
    bpb = {name: run["scores"]["hfllm_shakespeare_ppl"]["bits_per_byte"] for name, run in results.items()}
    for name in ("int8", "nf4"):
        assert bpb[name] != bpb["float"] and bpb[name] == pytest.approx(bpb["float"], rel=0.05)
