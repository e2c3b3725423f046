"""`hfllm generate` and `hfllm chat`: equal to transformers' generate() token for token (also with --cache static and
--compile), streamed text equal to the finished text, chat template and history applied, stop strings, --json counts,
one-line errors.

Most tests run on a tiny random hfllm model with a ChatML template (milliseconds per token); a few on SmolLM2-135M.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfllm.cli import main as cli
from hfllm.inference.generate import complete
from hfllm.inference.options import Decoding, load_for_inference
from hfllm.inference.session import ChatSession
from hfllm.inference.stream import StopFilter, cut_at_stop
from hfllm.inference.transformers_engine import TransformersEngine

PROMPTS = ["What is 3 + 4?", "You", "reverse the word cat please"]  # different lengths: padding
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def no_template_dir(tiny_chat_dir, tmp_path_factory):
    """The same model, its tokenizer saved without a chat template."""
    folder = tmp_path_factory.mktemp("tiny-plain")
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    tokenizer.chat_template = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).chat_template is None
    return folder


@pytest.fixture(scope="module")
def reference(tiny_chat_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir, padding_side="left")
    return model, tokenizer


def run(capsys, *argv: str, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    """`hfllm ARGV` in process -> (exit code, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.split("\n") if line]


def greedy_reference(model, tokenizer, texts: list[str], max_new_tokens: int, chat: bool = False) -> list[list[int]]:
    """model.generate on the left-padded batch -> each row's new tokens up to and including its first EOS."""
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    rows = []
    for row in out[:, batch.input_ids.shape[1]:].tolist():
        end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        rows.append(row[:end])
    return rows


# ----------------------------------------------------------------------------- generate: equal to model.generate


def test_greedy_single_prompt_equals_model_generate(capsys, tiny_chat_dir, reference):
    code, out, _ = run(capsys, "generate", tiny_chat_dir, "--prompt", PROMPTS[0], "--max_new_tokens", 20, "--json")
    assert code == 0
    [record] = records(out)
    [expected] = greedy_reference(*reference, [PROMPTS[0]], 20)
    assert record["completion_token_ids"] == expected
    assert record["text"] == reference[1].decode(expected, skip_special_tokens=True)


def test_greedy_batch_from_prompt_file_equals_left_padded_model_generate(capsys, tmp_path, tiny_chat_dir, reference):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")  # a blank line is no prompt
    code, out, _ = run(capsys, "generate", tiny_chat_dir, "--prompt_file", prompt_file, "--max_new_tokens", 20, "--json")
    assert code == 0
    got = records(out)
    assert [r["prompt"] for r in got] == PROMPTS
    batch = reference[1](PROMPTS, padding=True, return_tensors="pt")
    assert (batch.attention_mask == 0).any()  # the batch really is left-padded
    expected = greedy_reference(*reference, PROMPTS, 20)
    assert [r["completion_token_ids"] for r in got] == expected
    # and the plain output: the texts, a blank line between
    code, plain, _ = run(capsys, "generate", tiny_chat_dir, "--prompt_file", prompt_file, "--max_new_tokens", 20)
    assert plain == "\n\n".join(r["text"] for r in got) + "\n"


def test_prompt_from_stdin(capsys, monkeypatch, tiny_chat_dir):
    code, out, _ = run(capsys, "generate", tiny_chat_dir, "--max_new_tokens", 8, "--json", stdin=PROMPTS[0] + "\n",
                       monkeypatch=monkeypatch)
    code_flag, out_flag, _ = run(capsys, "generate", tiny_chat_dir, "--max_new_tokens", 8, "--json", "--prompt", PROMPTS[0])
    assert code == code_flag == 0
    assert records(out)[0]["prompt"] == PROMPTS[0]
    assert records(out)[0]["completion_token_ids"] == records(out_flag)[0]["completion_token_ids"]


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("extra", [[], ["--chat"], ["--stop", "FROM-TEXT"], ["--stop", "HELD-AT-END"]])
def test_streamed_text_equals_non_streamed(capsys, tiny_chat_dir, extra):
    base = ["generate", tiny_chat_dir, "--prompt", PROMPTS[2], "--max_new_tokens", 30]
    if extra[-1:] in (["FROM-TEXT"], ["HELD-AT-END"]):
        _, out, _ = run(capsys, *base, "--json")
        text = records(out)[0]["text"]
        middle = text[len(text) // 2: len(text) // 2 + 3]  # stops there
        never = text[-2:] + "~~~~"  # the text ends with its start: held back while streaming, then flushed
        extra = ["--stop", middle if extra[-1] == "FROM-TEXT" else never]
    code, plain, _ = run(capsys, *base, *extra)
    code_stream, streamed, _ = run(capsys, *base, *extra, "--stream")
    assert code == code_stream == 0
    assert streamed == plain
    assert plain.strip()


def test_stop_filter_holds_back_a_split_stop_string():
    pieces = ["Hello wo", "rld. The E", "N", "D is near, the END"]
    flt = StopFilter(["END", "xyz"])
    out = "".join(flt.feed(p) for p in pieces) + flt.flush()
    assert out == cut_at_stop("".join(pieces), ["END", "xyz"])[0] == "Hello world. The "
    passthrough = StopFilter(["never"])  # no stop: everything passes, a held-back "N" included
    assert "".join(passthrough.feed(p) for p in pieces) + passthrough.flush() == "".join(pieces)


# ----------------------------------------------------------------------------- chat template, stop strings, --json


def test_chat_flag_applies_the_template(capsys, tiny_chat_dir, reference):
    model, tokenizer = reference
    code, out, _ = run(capsys, "generate", tiny_chat_dir, "--chat", "--prompt", "Hi there", "--system", "Be brief.",
                       "--max_new_tokens", 12, "--json")
    assert code == 0
    [record] = records(out)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert record["rendered_prompt"] == rendered
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>") and rendered.endswith("<|im_start|>assistant\n")
    assert record["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False).input_ids)
    [expected] = greedy_reference(model, tokenizer, [rendered], 12, chat=True)
    assert record["completion_token_ids"] == expected


def test_stop_string_cuts_the_text_and_halts_generation(capsys, tiny_chat_dir):
    base = ["generate", tiny_chat_dir, "--prompt", PROMPTS[2], "--max_new_tokens", 40, "--json"]
    _, out, _ = run(capsys, *base)
    full = records(out)[0]
    assert full["finish_reason"] == "length" and full["completion_tokens"] == 40
    stop = full["text"][len(full["text"]) // 3:][:4]
    code, out, _ = run(capsys, *base, "--stop", stop, "--stop", "never-seen-text")
    assert code == 0
    [cut] = records(out)
    assert cut["text"] == full["text"][: full["text"].index(stop)]
    assert stop not in cut["text"]
    assert cut["finish_reason"] == "stop"
    assert cut["completion_tokens"] < full["completion_tokens"]  # it halted, not just cut
    assert cut["completion_token_ids"] == full["completion_token_ids"][: cut["completion_tokens"]]


def test_stop_string_in_a_padded_batch(capsys, tmp_path, tiny_chat_dir):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS), encoding="utf-8")
    base = ["generate", tiny_chat_dir, "--prompt_file", prompt_file, "--max_new_tokens", 30, "--json"]
    _, out, _ = run(capsys, *base)
    full = records(out)
    stop = full[1]["text"][5:8]
    _, out, _ = run(capsys, *base, "--stop", stop)
    for before, after in zip(full, records(out)):
        if stop in before["text"]:
            assert after["text"] == before["text"][: before["text"].index(stop)] and after["finish_reason"] == "stop"
            assert after["completion_token_ids"] == before["completion_token_ids"][: after["completion_tokens"]]
        else:
            assert after == {**before, **{k: after[k] for k in ("time_to_first_token_s", "seconds", "tokens_per_s")}}


def test_every_caller_generates_through_one_helper(reference):
    """`hfllm generate --chat`, the eval-time regression prompts, chat exact match and the chat session all decode
    through `hfllm.generation`: greedy, they give the same answers (batched and left-padded, or one at a time)."""
    from hfllm.evaluation.callback import EvalCallback
    from hfllm.evaluation.exact_match import chat_exact_match, parse_answer
    from hfllm.generation import generate_texts

    model, tokenizer = reference
    decoding = Decoding(max_new_tokens=12)
    answers = [c.text for c in complete(model, tokenizer, PROMPTS, decoding, chat=True)]
    assert generate_texts(model, tokenizer, PROMPTS, chat=True, batch_size=8, max_new_tokens=12,
                          do_sample=False) == answers
    callback = EvalCallback.__new__(EvalCallback)  # only its generation settings, no trainer
    callback.apply_chat_template, callback.max_new_tokens = True, 12
    assert callback.generate(model, tokenizer, PROMPTS) == answers
    items = [{"prompt": prompt, "answer": parse_answer(answer)} for prompt, answer in zip(PROMPTS, answers)]
    assert chat_exact_match(model, tokenizer, items, max_new_tokens=12) == 1.0
    for prompt, answer in zip(PROMPTS, answers):
        assert ChatSession(TransformersEngine(model, tokenizer), decoding).reply(prompt, io.StringIO()) == answer


def test_completion_rows_end_at_eos_or_at_the_stop_string(reference):
    """A batch row is padded after its end (pad == eos here): its length and finish reason are still right."""
    from hfllm.inference.transformers_engine import _completion

    model, tokenizer = reference
    eos = tokenizer.eos_token_id
    config = Decoding(stop=["cat"]).generation_config(model, tokenizer)

    def ends(prompt: str, *texts: str, pad: int = 0) -> tuple[str, int, str]:
        ids = [i for text in texts for i in tokenizer(text, add_special_tokens=False).input_ids] + [eos] * pad
        c = _completion(tokenizer, config, torch.tensor(ids), prompt, prompt, 1, 0, 0.1, 1.0)
        assert c.completion_token_ids == ids[: c.completion_tokens]
        return c.text, c.completion_tokens, c.finish_reason

    n = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    assert ends("Say:", "the", " cat", pad=2) == ("the ", n("the") + n(" cat"), "stop")
    assert ends("Say:", "the", " sat", pad=3) == ("the sat", n("the") + n(" sat") + 1, "eos")
    assert ends("Say:", "the", " sat") == ("the sat", n("the") + n(" sat"), "length")
    assert ends("a ca", "t", pad=2) == ("t", n("t"), "stop")  # the stop string began in the prompt: nothing to cut


def test_json_fields_and_counts(capsys, tiny_chat_dir, reference):
    tokenizer = reference[1]
    code, out, _ = run(capsys, "generate", tiny_chat_dir, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                       "--max_new_tokens", 16, "--do_sample", "--seed", 3, "--num_return_sequences", 2, "--json")
    assert code == 0
    got = records(out)
    assert [(r["prompt"], r["sequence"]) for r in got] == [(PROMPTS[0], 0), (PROMPTS[0], 1), (PROMPTS[1], 0), (PROMPTS[1], 1)]
    for r in got:
        assert set(r) == {"prompt", "rendered_prompt", "sequence", "text", "prompt_tokens", "completion_tokens",
                          "completion_token_ids", "finish_reason", "time_to_first_token_s", "seconds", "tokens_per_s"}
        assert r["prompt_tokens"] == len(tokenizer(r["prompt"]).input_ids)
        assert r["completion_tokens"] == len(r["completion_token_ids"]) <= 16
        assert r["finish_reason"] in ("eos", "length")
        assert (r["finish_reason"] == "length") == (r["completion_tokens"] == 16 and r["completion_token_ids"][-1] != tokenizer.eos_token_id)
        assert r["text"] == tokenizer.decode(r["completion_token_ids"], skip_special_tokens=True)
        assert 0 < r["time_to_first_token_s"] <= r["seconds"]
        assert r["tokens_per_s"] == pytest.approx(r["completion_tokens"] / r["seconds"], rel=0.01)
    # the same seed samples the same tokens
    _, again, _ = run(capsys, "generate", tiny_chat_dir, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                      "--max_new_tokens", 16, "--do_sample", "--seed", 3, "--num_return_sequences", 2, "--json")
    assert [r["completion_token_ids"] for r in records(again)] == [r["completion_token_ids"] for r in got]


def test_decoding_options_reach_the_generation_config(reference):
    model, tokenizer = reference
    decoding = Decoding(max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05,
                        repetition_penalty=1.2, stop=["\n"], cache="static")
    config = decoding.generation_config(model, tokenizer)
    assert (config.max_new_tokens, config.do_sample, config.temperature, config.top_p, config.top_k, config.min_p,
            config.repetition_penalty, config.stop_strings, config.cache_implementation) == (
        5, True, 0.7, 0.9, 20, 0.05, 1.2, ["\n"], "static")
    greedy = Decoding(max_new_tokens=5).generation_config(model, tokenizer)
    assert greedy.do_sample is False and greedy.temperature is None and greedy.stop_strings is None


def test_static_cache_gives_the_same_tokens(capsys, tiny_chat_dir):
    base = ["generate", tiny_chat_dir, "--prompt", PROMPTS[0], "--max_new_tokens", 12, "--json"]
    _, dynamic, _ = run(capsys, *base)
    _, static, _ = run(capsys, *base, "--cache", "static")
    assert records(static)[0]["completion_token_ids"] == records(dynamic)[0]["completion_token_ids"]


@pytest.fixture
def compile_calls(monkeypatch):
    """Record torch.compile calls (generate() compiles the decode step through it); compiled with dynamo's "eager"
    backend, which traces the same graph but skips inductor's code generation (minutes on two busy cores)."""
    real_compile, calls = torch.compile, []

    def spy(function, **options):
        calls.append(options)
        return real_compile(function, backend="eager", fullgraph=options.get("fullgraph", False))

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", spy)
    yield calls
    torch._dynamo.reset()


def test_compile_flag_reaches_the_generation_config(reference):
    config = Decoding(max_new_tokens=5, compile=True).generation_config(*reference)
    assert config.cache_implementation == "static" and config.compile_config is not None
    assert Decoding(max_new_tokens=5).generation_config(*reference).compile_config is None


def test_compiled_decode_gives_the_tokens_of_model_generate(capsys, tiny_chat_dir, reference, compile_calls,
                                                            single_thread):
    """`--compile` on a CPU: generate() runs the decode step through torch.compile, with the same greedy tokens."""
    code, out, _ = run(capsys, "generate", tiny_chat_dir, "--prompt", PROMPTS[0], "--max_new_tokens", 12, "--json",
                       "--compile")
    assert code == 0
    assert len(compile_calls) == 1
    [expected] = greedy_reference(*reference, [PROMPTS[0]], 12)
    assert records(out)[0]["completion_token_ids"] == expected
    # streamed (generate() in a thread, as `hfllm chat` runs it): compiled too, the same text
    code, streamed, _ = run(capsys, "generate", tiny_chat_dir, "--prompt", PROMPTS[0], "--max_new_tokens", 12,
                            "--stream", "--compile")
    assert code == 0 and len(compile_calls) == 2
    assert streamed == reference[1].decode(expected, skip_special_tokens=True) + "\n"


@pytest.mark.slow
def test_inductor_compiled_decode_gives_the_tokens_of_model_generate(tiny_chat_dir, reference, single_thread):
    """The real thing (inductor's C++ kernels), a few minutes on two busy cores: the same greedy tokens, in a batch."""
    model, tokenizer = load_for_inference(str(tiny_chat_dir), "auto")
    torch._dynamo.reset()
    got = complete(model, tokenizer, PROMPTS, Decoding(max_new_tokens=12, compile=True))
    assert hasattr(model, "_compiled_call")  # transformers' generate() took the compiled path
    assert [c.completion_token_ids for c in got] == greedy_reference(*reference, PROMPTS, 12)


def rounded_to_float16(model):
    """A copy of `model` whose Linear weights (the tied LM head included) were rounded to float16 and back."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(module.weight.half().float())
    return model


def test_float16_weights_give_the_greedy_tokens_of_their_weights(capsys, tiny_chat_dir, reference, single_thread):
    """`--float16_weights` packs every Linear (the tied LM head too) for fbgemm; greedy decoding gives exactly
    model.generate's tokens on the same weights rounded to float16 (fbgemm computes in float32), batched, streamed
    and in chat; the logits stay within float16 rounding of float32's."""
    model, tokenizer = load_for_inference(str(tiny_chat_dir), "float32", float16_weights=True)
    packed = [m for m in model.modules() if type(m).__name__ == "Float16PackedLinear"]
    assert packed and not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert model.get_output_embeddings() in packed
    rounded = rounded_to_float16(reference[0])
    batch = reference[1](PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours, theirs, exact = (m(**batch).logits for m in (model, rounded, reference[0]))  # (B, T, V)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert 0 < (ours - exact).abs().max() < 0.05

    got = complete(model, tokenizer, PROMPTS, Decoding(max_new_tokens=12))
    assert [c.completion_token_ids for c in got] == greedy_reference(rounded, reference[1], PROMPTS, 12)
    code, streamed, _ = run(capsys, "generate", tiny_chat_dir, "--prompt", PROMPTS[2], "--max_new_tokens", 12,
                            "--stream", "--float16_weights")
    assert code == 0 and streamed == got[2].text + "\n"


def test_float16_weights_compiled_give_the_same_tokens(capsys, tiny_chat_dir, compile_calls, single_thread):
    """`--float16_weights --compile`: the packed GEMM is an opaque custom op inside the compiled decode step, with
    the tokens of `--float16_weights` alone."""
    base = ["generate", tiny_chat_dir, "--prompt", PROMPTS[0], "--max_new_tokens", 12, "--json", "--float16_weights"]
    _, plain, _ = run(capsys, *base)
    code, compiled, _ = run(capsys, *base, "--compile")
    assert code == 0 and len(compile_calls) == 1
    assert records(compiled)[0]["completion_token_ids"] == records(plain)[0]["completion_token_ids"]


# ----------------------------------------------------------------------------- bad input: one line, exit 2


@pytest.fixture(scope="module")
def bad_inputs(tiny_chat_dir, no_template_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-inputs")
    empty = folder / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    two = folder / "two.txt"
    two.write_text("a\nb\n", encoding="utf-8")
    m = str(tiny_chat_dir)
    return {
        "missing model": (["/no/such/model", "--prompt", "x"], "does not exist"),
        "empty prompt file": ([m, "--prompt_file", empty], "holds no prompt"),
        "missing prompt file": ([m, "--prompt_file", folder / "nope.txt"], "does not exist"),
        "empty prompt": ([m, "--prompt", " "], "empty prompt"),
        "temperature 0": ([m, "--prompt", "x", "--temperature", "0"], "--temperature must be > 0"),
        "negative temperature": ([m, "--prompt", "x", "--do_sample", "--temperature", "-1"], "--temperature must be > 0"),
        "top_p 0": ([m, "--prompt", "x", "--top_p", "0"], "--top_p must be in (0, 1]"),
        "top_p above 1": ([m, "--prompt", "x", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
        "max_new_tokens 0": ([m, "--prompt", "x", "--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
        "max_new_tokens not int": ([m, "--prompt", "x", "--max_new_tokens", "ten"], "invalid int value"),
        "stream with several prompts": ([m, "--prompt", "a", "--prompt", "b", "--stream"], "--stream works on one prompt"),
        "stream from a prompt file": ([m, "--prompt_file", two, "--stream"], "--stream works on one prompt"),
        "chat without a template": ([no_template_dir, "--prompt", "x", "--chat"], "has no chat template"),
        "greedy with temperature": ([m, "--prompt", "x", "--greedy", "--temperature", "0.5"], "drop --greedy"),
        "several sequences greedy": ([m, "--prompt", "x", "--num_return_sequences", "2"], "needs sampling"),
        "unknown flag": ([m, "--prompt", "x", "--temprature", "0.5"], "unrecognized arguments"),
        "no model": ([], "required"),
        "float16 weights of bfloat16": ([m, "--prompt", "x", "--float16_weights", "--dtype", "bfloat16"],
                                        "--float16_weights packs float32 weights"),
    }


BAD = ["missing model", "empty prompt file", "missing prompt file", "empty prompt", "temperature 0",
       "negative temperature", "top_p 0", "top_p above 1", "max_new_tokens 0", "max_new_tokens not int",
       "stream with several prompts", "stream from a prompt file", "chat without a template", "greedy with temperature",
       "several sequences greedy", "unknown flag", "no model", "float16 weights of bfloat16"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_exit_2(capsys, bad_inputs, case):
    argv, message = bad_inputs[case]
    code, out, err = run(capsys, "generate", *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("hfllm generate: error:") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err


def hfllm_process(*argv, stdin: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "hfllm", *map(str, argv)], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)


def test_bad_input_in_a_real_process(no_template_dir):
    result = hfllm_process("generate", no_template_dir, "--chat", "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr.startswith("hfllm generate: error:") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    chat = hfllm_process("chat", "/no/such/model")
    assert chat.returncode == 2 and chat.stderr.startswith("hfllm chat: error:") and chat.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- chat


def prompts_shown(err: str) -> list[str]:
    """The rendered prompts `hfllm chat --show_prompt` printed on stderr."""
    return [block.split("\n--- end of prompt ---")[0] for block in err.split("--- prompt ---\n")[1:]]


def test_chat_history_reset_system_and_save(capsys, monkeypatch, tmp_path, tiny_chat_dir, reference):
    tokenizer = reference[1]
    saved = tmp_path / "conversation.json"
    lines = ["first question", "second question", f"/save {saved}", f"/save {tmp_path}/no/such/folder/x.json",
             "/reset", "third question",
             "/system You are terse.", "fourth question", "/exit", "never read"]
    code, out, err = run(capsys, "chat", tiny_chat_dir, "--max_new_tokens", 8, "--show_prompt",
                         stdin="\n".join(lines) + "\n", monkeypatch=monkeypatch)
    assert code == 0
    answers = out.split("\n")[:-1]
    assert len(answers) == 4  # one line per answer (random tokens hold no newline here)
    first, second, third, fourth = prompts_shown(err)
    user, assistant = [{"role": "user", "content": "first question"}], {"role": "assistant", "content": answers[0]}
    assert first == tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    history = [*user, assistant, {"role": "user", "content": "second question"}]
    assert second == tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert "first question" in second and answers[0] in second  # the first turn is in the second prompt
    assert json.loads(saved.read_text()) == [*history, {"role": "assistant", "content": answers[1]}]
    assert "could not save to" in err and "Traceback" not in err  # a bad /save path is a note, the chat goes on
    assert "first question" not in third and "second question" not in third  # /reset
    assert third == tokenizer.apply_chat_template([{"role": "user", "content": "third question"}], tokenize=False,
                                                  add_generation_prompt=True)
    assert fourth.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")  # /system
    assert "third question" in fourth


def test_chat_answer_equals_generate_with_chat(capsys, monkeypatch, tiny_chat_dir):
    _, out, _ = run(capsys, "chat", tiny_chat_dir, "--max_new_tokens", 10, stdin="hello\n", monkeypatch=monkeypatch)
    _, generated, _ = run(capsys, "generate", tiny_chat_dir, "--chat", "--prompt", "hello", "--max_new_tokens", 10)
    assert out == generated


def test_chat_warns_and_trims_when_the_history_outgrows_the_context(capsys, monkeypatch, tiny_chat_dir, reference):
    long = " ".join(["reverse the word cat please"] * 4)  # 138 tokens rendered alone, with the default system turn
    stdin = "\n".join([long, long, "/trim", "short"]) + "\n"
    _, _, err = run(capsys, "chat", tiny_chat_dir, "--max_new_tokens", 50, "--show_prompt", stdin=stdin,
                    monkeypatch=monkeypatch)
    assert "outgrows the context window of 256 tokens" in err
    assert "/trim drops the oldest turns" in err
    shown = prompts_shown(err)
    assert "dropped 2 messages" in err and shown[-1].count(long) < shown[-2].count(long)
    tokenizer = reference[1]
    assert len(tokenizer(shown[-1], add_special_tokens=False).input_ids) + 50 <= 256  # fits after /trim
    _, _, err = run(capsys, "chat", tiny_chat_dir, "--max_new_tokens", 50, "--trim", "--show_prompt",
                    stdin="\n".join([long] * 3) + "\n", monkeypatch=monkeypatch)
    assert "outgrows" not in err and "dropped the 2 oldest messages" in err  # --trim keeps it inside the window
    assert all(len(tokenizer(p, add_special_tokens=False).input_ids) + 50 <= 256 for p in prompts_shown(err))


def test_chat_session_trim_keeps_the_last_user_turn(reference):
    model, tokenizer = reference
    session = ChatSession(TransformersEngine(model, tokenizer), Decoding(max_new_tokens=120))
    session.turns = [{"role": r, "content": "word " * 20} for r in ("user", "assistant") * 3]
    session.turns.append({"role": "user", "content": "last"})
    assert not session.fits()
    dropped = session.trim()
    assert dropped % 2 == 0 and dropped > 0
    assert session.turns[-1]["content"] == "last" and session.turns[0]["role"] == "user"
    assert session.fits()


def test_chat_in_a_real_process(tmp_path, tiny_chat_dir):
    saved = tmp_path / "chat.json"
    result = hfllm_process("chat", tiny_chat_dir, "--max_new_tokens", 6, stdin=f"hi\nhow are you\n/save {saved}\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages[1::2]] == result.stdout.splitlines()
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- SmolLM2 (real weights)


def test_smollm2_answers_and_stops_at_a_stop_string(capsys, smollm2_hfllm_dir):
    """Quick: a real chat model, its template, a stop string inside the answer."""
    base = ["generate", smollm2_hfllm_dir, "--chat", "--prompt", "What is the capital of France?", "--max_new_tokens", 12, "--json"]
    code, out, _ = run(capsys, *base, "--stop", "Paris")
    assert code == 0
    [record] = records(out)
    assert record["text"] == "The capital of France is "
    assert record["finish_reason"] == "stop" and record["completion_tokens"] < 12
    assert record["rendered_prompt"].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.slow
def test_smollm2_greedy_batch_and_stream_equal_model_generate(capsys, tmp_path, smollm2_hfllm_dir):
    model = AutoModelForCausalLM.from_pretrained(smollm2_hfllm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_hfllm_dir, padding_side="left")
    questions = ["What is the capital of France?", "List three prime numbers.", "Write a line about rain."]
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                              add_generation_prompt=True) for q in questions]
    prompt_file = tmp_path / "questions.txt"
    prompt_file.write_text("\n".join(questions), encoding="utf-8")
    code, out, _ = run(capsys, "generate", smollm2_hfllm_dir, "--chat", "--prompt_file", prompt_file, "--max_new_tokens", 24,
                       "--json")
    assert code == 0
    got = records(out)
    assert [r["completion_token_ids"] for r in got] == greedy_reference(model, tokenizer, rendered, 24, chat=True)
    assert "Paris" in got[0]["text"]
    _, streamed, _ = run(capsys, "generate", smollm2_hfllm_dir, "--chat", "--prompt", questions[1], "--max_new_tokens", 24,
                         "--stream")
    assert streamed == got[1]["text"] + "\n"


@pytest.mark.slow
def test_smollm2_chat_remembers_the_first_turn(smollm2_hfllm_dir):
    result = hfllm_process("chat", smollm2_hfllm_dir, "--max_new_tokens", 16, "--show_prompt",
                           stdin="My name is Ana.\nWhat is my name?\n")
    assert result.returncode == 0, result.stderr
    second = prompts_shown(result.stderr)[1]
    assert "My name is Ana." in second
    assert "Ana" in result.stdout.splitlines()[1]
