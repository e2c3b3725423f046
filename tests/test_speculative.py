"""Speculative decoding: `--assistant MODEL`, `--prompt_lookup N` and `--assistant_early_exit K` give the tokens of
plain greedy decoding, token for token, while really drafting (the model runs fewer forward passes, or its last
layers fewer times, than it generates tokens); a draft with another vocabulary and mixed methods are one line.
"""

import io
import json
import sys

import pytest
import torch
from helpers import chat_bpe_tokenizer

from hfllm.cli import main as cli
from hfllm.inference.generate import complete, stream
from hfllm.inference.options import Decoding, load_assistant, load_for_inference
from hfllm.inference.session import ChatSession
from hfllm.inference.transformers_engine import TransformersEngine

PROMPTS = ["What is 3 + 4? What is 3 + 4? What is", "reverse the word cat, then reverse the word dog", "You"]


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A random 1-layer hfllm model with the same tokenizer as the tiny chat models: a draft that is mostly wrong."""
    from hfllm import HfllmForCausalLM, get_preset

    tokenizer = chat_bpe_tokenizer()
    torch.manual_seed(1)
    config = get_preset("llama-tiny", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-draft")
    HfllmForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class CallCounter:
    """Counts the forward calls of some modules (hooks removed on exit)."""

    def __init__(self, **modules: torch.nn.Module):
        self.modules, self.calls = modules, dict.fromkeys(modules, 0)

    def __enter__(self):
        self.handles = [module.register_forward_hook(lambda *_, name=name: self._count(name))
                        for name, module in self.modules.items()]
        return self.calls

    def _count(self, name: str) -> None:
        self.calls[name] += 1

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def token_ids(model, tokenizer, decoding: Decoding, assistant=None) -> list[list[int]]:
    return [c.completion_token_ids for c in complete(model, tokenizer, PROMPTS, decoding, batch_size=1,
                                                     assistant_model=assistant)]


@pytest.mark.parametrize("method", ["assistant", "prompt_lookup", "assistant_early_exit"])
def test_speculative_tokens_equal_greedy(tiny_hfllm_chat_dir, draft_dir, method, single_thread):
    model, tokenizer = load_for_inference(str(tiny_hfllm_chat_dir), "auto")
    greedy = token_ids(model, tokenizer, Decoding(max_new_tokens=24))
    value = {"assistant": str(draft_dir), "prompt_lookup": 4, "assistant_early_exit": 1}[method]
    decoding = Decoding(max_new_tokens=24, **{method: value})
    assistant = load_assistant(str(draft_dir), model, tokenizer, "auto") if method == "assistant" else None
    assert token_ids(model, tokenizer, decoding, assistant) == greedy


def test_drafts_are_accepted(tiny_hfllm_chat_dir, single_thread):
    """The model as its own draft: every drafted token is accepted, so the model runs fewer forward passes than it
    generates tokens (plain greedy: one per token), with the same tokens. (transformers stops a draft where the draft's
    own confidence falls below `assistant_confidence_threshold`, often, on a random model.)"""
    model, tokenizer = load_for_inference(str(tiny_hfllm_chat_dir), "auto")
    draft, _ = load_for_inference(str(tiny_hfllm_chat_dir), "auto")
    decoding = Decoding(max_new_tokens=24, assistant=str(tiny_hfllm_chat_dir))
    with CallCounter(model=model) as plain:
        greedy = token_ids(model, tokenizer, Decoding(max_new_tokens=24))
    with CallCounter(model=model) as speculative:
        assert token_ids(model, tokenizer, decoding, draft) == greedy
    generated = sum(map(len, greedy))
    assert plain["model"] == generated
    assert speculative["model"] <= generated / 1.5


def test_early_exit_drafts_with_the_first_layers(tiny_hfllm_chat_dir, single_thread):
    """Self-speculation runs the first K layers for the drafts and all layers only to verify them."""
    model, tokenizer = load_for_inference(str(tiny_hfllm_chat_dir), "auto")
    first, last = model.model.layers[0], model.model.layers[-1]
    with CallCounter(first=first, last=last) as calls:
        complete(model, tokenizer, PROMPTS[:1], Decoding(max_new_tokens=16, assistant_early_exit=1))
    assert calls["first"] > calls["last"] > 0


def test_prompt_lookup_copies_from_the_prompt(tiny_hfllm_chat_dir, single_thread):
    """A prompt that holds what greedy decoding then writes: the n-gram drafts are accepted, fewer forward passes."""
    model, tokenizer = load_for_inference(str(tiny_hfllm_chat_dir), "auto")
    seed = complete(model, tokenizer, ["Copy this:"], Decoding(max_new_tokens=30))[0]
    prompt = seed.rendered_prompt + seed.text + "\n" + seed.rendered_prompt  # the model will write `seed.text` again
    with CallCounter(model=model) as plain:
        (expected,) = complete(model, tokenizer, [prompt], Decoding(max_new_tokens=30))
    with CallCounter(model=model) as lookup:
        (copied,) = complete(model, tokenizer, [prompt], Decoding(max_new_tokens=30, prompt_lookup=8))
    assert copied.completion_token_ids == expected.completion_token_ids
    assert lookup["model"] < plain["model"] / 2


def test_stream_and_chat_with_an_assistant(tiny_llama_chat_dir, draft_dir, single_thread):
    model, tokenizer = load_for_inference(str(tiny_llama_chat_dir), "auto")
    draft = load_assistant(str(draft_dir), model, tokenizer, "auto")
    decoding = Decoding(max_new_tokens=16, assistant=str(draft_dir))
    (expected,) = complete(model, tokenizer, PROMPTS[:1], Decoding(max_new_tokens=16), chat=True)
    out = io.StringIO()
    streamed = stream(model, tokenizer, PROMPTS[0], decoding, out, chat=True, assistant_model=draft)
    assert out.getvalue() == streamed.text == expected.text
    session = ChatSession(TransformersEngine(model, tokenizer, assistant_model=draft), decoding)
    assert session.reply(PROMPTS[0], io.StringIO()) == expected.text


def test_cli_speculative_equals_greedy(tiny_llama_chat_dir, capsys, monkeypatch, single_thread):
    base = ["generate", str(tiny_llama_chat_dir), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--json",
            "--max_new_tokens", "12"]
    assert cli(base) == 0
    greedy = [json.loads(line)["completion_token_ids"] for line in capsys.readouterr().out.splitlines()]
    for flags in (["--prompt_lookup", "3"], ["--assistant_early_exit", "1"], ["--assistant", str(tiny_llama_chat_dir)]):
        assert cli(base + flags) == 0
        assert [json.loads(line)["completion_token_ids"] for line in capsys.readouterr().out.splitlines()] == greedy
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert cli(["chat", str(tiny_llama_chat_dir), "--prompt_lookup", "3", "--max_new_tokens", "4"]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--assistant", "{other}"], "has a different vocabulary"),
    (["--prompt_lookup", "3", "--assistant_early_exit", "1"],
     "--prompt_lookup and --assistant_early_exit are two ways of drafting tokens; choose one"),
    (["--prompt_lookup", "0"], "--prompt_lookup must be at least 1 (got 0)"),
    (["--assistant_early_exit", "2"], "--assistant_early_exit 2 must be below the model's 2 layers"),
    (["--prompt_lookup", "3", "--do_sample", "--num_return_sequences", "2"],
     "--prompt_lookup decodes one sequence at a time; drop --num_return_sequences or --prompt_lookup"),
])
def test_bad_speculative_options_are_one_line(tiny_llama_chat_dir, tiny_llama_shakespeare_dir, flags, message, capsys):
    flags = [flag.format(other=tiny_llama_shakespeare_dir) for flag in flags]
    assert cli(["generate", str(tiny_llama_chat_dir), "--prompt", "hi", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
