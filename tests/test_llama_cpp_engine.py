"""`hfllm generate/chat --engine llama.cpp`: the model exported to GGUF (cached by content) and decoded by llama.cpp.

The flag checks run in the default suite (no llama.cpp needed). The tests that decode need llama-cpp-python from
hfllm's cached wheel (`hfllm.assets.llama_cpp(build=False)`), are skipped with the reason where it is not built, and
are slow."""

import copy
import json

import pytest
import torch

from hfllm.checkpoint import load
from hfllm.inference.generate import complete
from hfllm.inference.llama_cpp_engine import content_key, sampling
from hfllm.inference.options import Decoding

from test_inference import PROMPTS, records, run


@pytest.fixture(scope="session")
def cached_llama_cpp():
    """llama-cpp-python from hfllm's cached wheel; skipped (never built here: minutes) where there is none."""
    from hfllm.assets import llama_cpp
    from hfllm.errors import HfllmError

    try:
        return llama_cpp(build=False)
    except HfllmError as error:
        pytest.skip(f"llama.cpp is not available without building it: {error}")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty $HFLLM_CACHE that still finds the llama-cpp-python wheel of the real one."""
    from hfllm.assets import cache_dir

    wheels = cache_dir() / "wheels"
    monkeypatch.setenv("HFLLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    if wheels.is_dir():
        (tmp_path / "cache" / "wheels").symlink_to(wheels)
    return tmp_path / "cache"


def rounded_to_float16(model):
    """A copy whose matrices (embedding and LM head included) are rounded to float16, as the f16 GGUF holds them
    (norm weights stay float32 there)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(parameter.half().float())
    return model


def engine_run(capsys, model, *argv):
    return run(capsys, "generate", model, "--engine", "llama.cpp", "--threads", 1, *argv)


# ----------------------------------------------------------------------------- flags (default suite)

TORCH_ONLY = [
    (["--compile"], "--compile is not available with --engine llama.cpp"),
    (["--float16_weights"], "--float16_weights is not available"),
    (["--dtype", "bfloat16"], "--dtype is not available"),
    (["--load_in_8bit"], "--load_in_8bit is not available"),
    (["--cache", "static"], "--cache is not available"),
    (["--prompt_lookup", "3"], "--prompt_lookup is not available"),
    (["--do_sample", "--num_return_sequences", "2"], "--num_return_sequences is not available"),
]


@pytest.mark.parametrize("extra, message", TORCH_ONLY)
def test_torch_only_flags_are_refused_in_one_line(capsys, tiny_chat_dir, extra, message):
    code, out, err = run(capsys, "generate", tiny_chat_dir, "--engine", "llama.cpp", "--prompt", "x", *extra)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("argv, message", [
    (["--gguf_quant", "q8_0"], "--gguf_quant picks the GGUF weights of --engine llama.cpp"),
    (["--engine", "llama.cpp", "--gguf_quant", "q5_1"], "invalid choice: 'q5_1'"),
    (["--engine", "llama.cpp", "--threads", "0"], "--threads must be at least 1"),
    (["--engine", "vllm"], "invalid choice: 'vllm'"),
])
def test_engine_flags_are_checked(capsys, tiny_chat_dir, argv, message):
    code, out, err = run(capsys, "generate", tiny_chat_dir, "--prompt", "x", *argv)
    assert code == 2 and out == "" and err.startswith("hfllm generate: error:") and err.count("\n") == 1
    assert message in err, err


def test_chat_refuses_the_web_page_and_a_gguf_given_a_quant(capsys, tmp_path, tiny_chat_dir):
    code, _, err = run(capsys, "chat", tiny_chat_dir, "--engine", "llama.cpp", "--web")
    assert code == 2 and "--web is not available with --engine llama.cpp" in err and err.count("\n") == 1
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    code, _, err = run(capsys, "chat", gguf, "--engine", "llama.cpp", "--gguf_quant", "q8_0")
    assert code == 2 and "is a GGUF file already" in err and err.count("\n") == 1


def test_missing_llama_cpp_is_one_line(capsys, tmp_path, monkeypatch, tiny_chat_dir):
    monkeypatch.setenv("HFLLM_CACHE", str(tmp_path))  # no wheel: refused, not built
    code, out, err = run(capsys, "generate", tiny_chat_dir, "--engine", "llama.cpp", "--prompt", "x")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "llama.cpp is not built here" in err and "--engine torch" in err
    assert not (tmp_path / "wheels").exists() and not (tmp_path / "gguf").exists()


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_model_is_one_line_and_exit_2(capsys, tmp_path, command):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")
    for model, message in (("/no/such/model", "does not exist"), (truncated, "is truncated or corrupt")):
        prompt = ["--prompt", "x"] if command == "generate" else []
        code, out, err = run(capsys, command, model, "--engine", "llama.cpp", *prompt)
        assert code == 2 and out == "", err
        assert err.startswith(f"hfllm {command}: error:") and err.count("\n") == 1 and message in err, err


def test_content_key_follows_the_files_not_the_path(tmp_path, tiny_chat_dir):
    import shutil

    copy_dir = shutil.copytree(tiny_chat_dir, tmp_path / "copy")
    assert content_key(str(copy_dir)) == content_key(str(tiny_chat_dir))
    (copy_dir / "config.json").write_text(json.dumps({**json.loads((copy_dir / "config.json").read_text()),
                                                      "rms_norm_eps": 1e-5}))
    assert content_key(str(copy_dir)) != content_key(str(tiny_chat_dir))


def test_sampling_arguments():
    assert sampling(Decoding()) == {"temp": 0.0, "repeat_penalty": 1.0}
    assert sampling(Decoding(do_sample=True, top_p=0.9, repetition_penalty=1.2)) == {
        "temp": 1.0, "top_k": 50, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.2}


# ----------------------------------------------------------------------------- decoding with llama.cpp (slow)


@pytest.mark.slow
def test_greedy_tokens_equal_the_torch_engine_on_f16_weights(capsys, cache, cached_llama_cpp, tiny_chat_dir,
                                                             single_thread):
    """The f16 export, decoded greedily by llama.cpp, gives the torch engine's tokens on the same weights rounded to
    float16, for plain prompts and chat turns; the second run reuses the cached export."""
    model, tokenizer = load(tiny_chat_dir, dtype=torch.float32)
    tokenizer.padding_side = "left"
    rounded = rounded_to_float16(model)
    for chat in (False, True):
        flags = ["--chat"] * chat
        code, out, err = engine_run(capsys, tiny_chat_dir, *sum((["--prompt", p] for p in PROMPTS), []),
                                    "--max_new_tokens", 12, "--json", *flags)
        assert code == 0, err
        expected = complete(rounded, tokenizer, PROMPTS, Decoding(max_new_tokens=12), chat=chat, batch_size=1)
        got = records(out)
        assert [r["completion_token_ids"] for r in got] == [c.completion_token_ids for c in expected]
        assert [r["text"] for r in got] == [c.text for c in expected]
        assert [r["rendered_prompt"] for r in got] == [c.rendered_prompt for c in expected]
        assert [r["prompt_tokens"] for r in got] == [c.prompt_tokens for c in expected]
    assert len(list(cache.glob("gguf/*/*.F16.gguf"))) == 1  # exported once


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--chat"], ["--stop", "HELD-AT-END"]])
def test_streamed_text_equals_non_streamed(capsys, cache, cached_llama_cpp, tiny_chat_dir, extra):
    base = ["--prompt", PROMPTS[0], "--max_new_tokens", 12, *extra]
    code, streamed, _ = engine_run(capsys, tiny_chat_dir, *base, "--stream")
    _, plain, _ = engine_run(capsys, tiny_chat_dir, *base)
    assert code == 0 and streamed == plain and plain.strip()


@pytest.mark.slow
def test_stop_string_cuts_the_text_and_halts_generation(capsys, cache, cached_llama_cpp, tiny_chat_dir):
    base = ["--prompt", PROMPTS[2], "--max_new_tokens", 16, "--json"]
    _, out, _ = engine_run(capsys, tiny_chat_dir, *base)
    [full] = records(out)
    stop = full["text"][len(full["text"]) // 2:][:2]  # two characters from the middle
    head = full["text"][: full["text"].index(stop)]
    _, out, _ = engine_run(capsys, tiny_chat_dir, *base, "--stop", stop)
    [cut] = records(out)
    assert cut["text"] == head and cut["finish_reason"] == "stop"
    assert cut["completion_tokens"] < full["completion_tokens"]
    assert cut["completion_token_ids"] == full["completion_token_ids"][: cut["completion_tokens"]]
    code, streamed, _ = engine_run(capsys, tiny_chat_dir, *base[:-1], "--stop", stop, "--stream")
    assert code == 0 and streamed == head + "\n"


@pytest.mark.slow
def test_chat_renders_the_template_and_keeps_the_history(capsys, monkeypatch, cache, cached_llama_cpp,
                                                         tiny_chat_dir):
    """`hfllm chat --engine llama.cpp`: each prompt is the GGUF's chat template over the whole history (the same
    text as the tokenizer's template renders); the first answer equals `generate --chat`'s."""
    _, tokenizer = load(tiny_chat_dir, with_tokenizer=True)
    code, out, err = run(capsys, "chat", tiny_chat_dir, "--engine", "llama.cpp", "--threads", 1, "--show_prompt",
                         "--max_new_tokens", 8, "--system", "Be brief.", stdin="hello\nand again\n",
                         monkeypatch=monkeypatch)
    assert code == 0, err
    first, second = out.split("\n")[:2]
    shown = [block.split("\n--- end of prompt ---")[0] for block in err.split("--- prompt ---\n")[1:]]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert shown[0] == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "and again"}]
    assert shown[1] == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    _, answer, _ = engine_run(capsys, tiny_chat_dir, "--chat", "--system", "Be brief.", "--prompt", "hello",
                              "--max_new_tokens", 8)
    assert answer == first + "\n"


@pytest.mark.slow
def test_sampling_with_a_seed_repeats(capsys, cache, cached_llama_cpp, tiny_chat_dir):
    base = ["--prompt", PROMPTS[0], "--max_new_tokens", 12, "--json", "--temperature", "1.5"]
    runs = [records(engine_run(capsys, tiny_chat_dir, *base, "--seed", seed)[1])[0] for seed in (1, 1, 2, 3)]
    assert runs[0]["completion_token_ids"] == runs[1]["completion_token_ids"]
    assert len({tuple(r["completion_token_ids"]) for r in runs[1:]}) > 1


@pytest.mark.slow
def test_a_model_gguf_cannot_hold_is_one_line_and_exit_2(capsys, tmp_path, cache, cached_llama_cpp,
                                                          tiny_llama_chat_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_chat_dir)
    model.config.hidden_act = "gelu"  # llama.cpp's llama architecture computes SiLU
    model.save_pretrained(tmp_path / "gelu")
    AutoTokenizer.from_pretrained(tiny_llama_chat_dir).save_pretrained(tmp_path / "gelu")
    code, out, err = engine_run(capsys, tmp_path / "gelu", "--prompt", "x")
    assert code == 2 and out == "" and err.count("\n") == 1 and "cannot export to GGUF: activation 'gelu'" in err
    assert not list(cache.glob("gguf/*/*.gguf"))


@pytest.mark.slow
def test_smollm2_greedy_equals_the_torch_engine(capsys, cache, cached_llama_cpp, smollm2_hfllm_dir, single_thread):
    """SmolLM2-135M-Instruct: 32 greedy tokens of a plain prompt and a chat turn through `--engine llama.cpp` (f16
    export) equal the torch engine's on the f16-rounded weights; the q8_0 export answers too."""
    model, tokenizer = load(smollm2_hfllm_dir, dtype=torch.float32)
    rounded = rounded_to_float16(model)
    for prompt, flags in [("The old lighthouse keeper counted the ships until", []), ("Name three colours.", ["--chat"])]:
        code, out, err = engine_run(capsys, smollm2_hfllm_dir, "--prompt", prompt, "--max_new_tokens", 32, "--json",
                                    *flags)
        assert code == 0, err
        (expected,) = complete(rounded, tokenizer, [prompt], Decoding(max_new_tokens=32), chat=bool(flags))
        assert records(out)[0]["completion_token_ids"] == expected.completion_token_ids, prompt
    code, out, err = engine_run(capsys, smollm2_hfllm_dir, "--gguf_quant", "q8_0", "--chat", "--prompt",
                                "What is 2 + 3?", "--max_new_tokens", 16)
    assert code == 0 and "5" in out, err
