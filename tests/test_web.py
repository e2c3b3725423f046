"""`hfllm chat MODEL --web`: the Gradio page answers like model.generate, applies the history, compares models side by
side, stops generating when a stream is abandoned, refuses a port in use; and a real Chromium types, sees the answer
stream in, and clears it.

The page runs as a real `hfllm chat --web` process on a free port (the compare page in this process), on tiny random
models: answers take milliseconds, starting Gradio takes the time.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from gradio_client import Client
from helpers import free_port
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfllm.cli import main as cli
from hfllm.inference.options import Decoding, load_for_inference
from hfllm.inference.stream import StreamedGeneration
from hfllm.inference.transformers_engine import TransformersEngine
from hfllm.inference.web import WebChat, build_app

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 24
SYSTEM = "You answer briefly."


def start_page(*argv: str, log: Path, timeout_s: float = 300) -> tuple[subprocess.Popen, str]:
    """`hfllm chat ... --web` as a process; returns it and its URL once Gradio says it is running."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "hfllm", "chat", *argv, "--web", "--port", str(port)],
                                   stdout=out, stderr=err, cwd=ROOT, env=env)
    deadline = time.monotonic() + timeout_s
    while "Running on local URL" not in log.with_suffix(".out").read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the web page did not start:\n{log.with_suffix('.err').read_text()[-3000:]}")
        time.sleep(0.2)
    return process, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def page(tiny_llama_chat_dir, tmp_path_factory):
    """(URL, file of its standard error) of `hfllm chat TINY --web --show_prompt`, greedy, 24 new tokens."""
    log = tmp_path_factory.mktemp("web") / "page"
    process, url = start_page(str(tiny_llama_chat_dir), "--max_new_tokens", str(MAX_NEW_TOKENS), "--show_prompt",
                              log=log)
    yield url, log.with_suffix(".err")
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def reference(tiny_llama_chat_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_chat_dir).eval(), AutoTokenizer.from_pretrained(
        tiny_llama_chat_dir)


def rendered(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def greedy_answer(reference, messages: list[dict], max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """model.generate on the chat template of `messages` -> the answer's text."""
    model, tokenizer = reference
    inputs = tokenizer(rendered(tokenizer, messages), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)  # (1, prompt + new)
    return tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)


def prompts_shown(err: str) -> list[str]:
    """The rendered prompts `--show_prompt` printed on standard error."""
    return re.findall(r"--- prompt \(.*?\) ---\n(.*?)\n--- end of prompt ---", err, re.S)


# ----------------------------------------------------------------------------- the page through gradio_client


def test_answer_streams_and_equals_model_generate(page, reference):
    url, _ = page
    message = "What is 3 + 4?"
    job = Client(url, verbose=False).submit(message, SYSTEM, api_name="/chat")
    answer = job.result(timeout=120)
    expected = greedy_answer(reference, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": message}])
    assert answer == expected and answer.strip()
    streamed = job.outputs()  # every text the page showed while the answer grew
    assert len(streamed) > 1 and streamed[-1] == answer
    assert all(answer.startswith(partial) for partial in streamed)


def test_second_turn_reads_the_history(page, reference):
    url, stderr = page
    tokenizer = reference[1]
    client = Client(url, verbose=False)  # a client is one browser session: the page keeps its conversation
    shown_before = len(prompts_shown(stderr.read_text()))
    first = client.predict("first question", "", api_name="/chat")
    second = client.predict("second question", "", api_name="/chat")
    history = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "second question"}]
    shown = prompts_shown(stderr.read_text())[shown_before:]
    assert shown == [rendered(tokenizer, history[:1]), rendered(tokenizer, history)]
    assert "first question" in shown[1] and first in shown[1]
    assert second == greedy_answer(reference, history)


@pytest.fixture(scope="module")
def tuned_dir(tiny_llama_chat_dir, tmp_path_factory):
    """`tiny_llama_chat_dir` with its weights nudged: a stand-in for a fine-tuned model, it answers differently."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_chat_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    folder = tmp_path_factory.mktemp("tiny-llama-tuned")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_chat_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def compare_page(tiny_llama_chat_dir, tuned_dir):
    """The page with the base and the "tuned" model side by side, served in this process."""
    decoding = Decoding(max_new_tokens=MAX_NEW_TOKENS)
    chats = [WebChat(str(spec), TransformersEngine(*load_for_inference(str(spec), "auto")), decoding)
             for spec in (tiny_llama_chat_dir, tuned_dir)]
    app = build_app(chats)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", chats
    app.close()


def test_compare_gives_one_answer_per_model(compare_page):
    url, chats = compare_page
    client = Client(url, verbose=False)
    message = "reverse the word cat please"
    cleared, *histories = client.predict(message, "", [], [], api_name="/compare")
    assert cleared == ""  # the message box empties
    answers = []
    for chat, history in zip(chats, histories):
        assert [m["role"] for m in history] == ["user", "assistant"]
        assert history[0]["content"][0]["text"] == message
        answers.append(history[1]["content"][0]["text"])
        expected = greedy_answer((chat.engine.model, chat.engine.tokenizer), [{"role": "user", "content": message}])
        assert answers[-1] == expected.strip()  # the Chatbot strips the ends of its messages
    assert all(answers) and answers[0] != answers[1]  # two different models answered
    # the next message goes to each model with its own history
    _, *again = client.predict("and now?", "", *histories, api_name="/compare")
    for chat, history, answer in zip(chats, again, answers):
        assert [m["content"][0]["text"] for m in history[:2]] == [message, answer]
        assert len(history) == 4


# ----------------------------------------------------------------------------- stop, bad input


def test_an_abandoned_stream_stops_generating(reference):
    """The page's stop button closes the answer's generator: generate() must stop, not run to max_new_tokens."""
    model, tokenizer = reference
    config = Decoding(max_new_tokens=200).generation_config(model, tokenizer)
    config.eos_token_id = None  # left alone, it generates all 200 tokens
    inputs = tokenizer(["Hello"], return_tensors="pt")
    run = StreamedGeneration(model, tokenizer, dict(inputs), config)
    pieces = iter(run)
    next(pieces)
    pieces.close()
    run.thread.join(timeout=60)
    assert not run.thread.is_alive()
    assert run.sequences.shape[1] - inputs.input_ids.shape[1] < 200


def test_port_in_use_is_one_line(capsys, tiny_llama_chat_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli(["chat", str(tiny_llama_chat_dir), "--web", "--port", str(port)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == f"hfllm chat: error: port {port} on 127.0.0.1 is in use; pick another with --port\n"


@pytest.mark.parametrize("flags, message", [
    (["--compare", "other"], "--compare is for the web page; add --web"),
    (["--port", "8000"], "--port is for the web page; add --web"),
    (["--web", "--port", "70000"], "--port must be in 1..65535"),
    (["--web", "--greedy", "--temperature", "0.5"], "drop --greedy"),
])
def test_bad_web_flags_are_one_line(capsys, tiny_llama_chat_dir, flags, message):
    code = cli(["chat", str(tiny_llama_chat_dir), *flags])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_missing_compare_model_is_one_line(capsys, tiny_llama_chat_dir):
    code = cli(["chat", str(tiny_llama_chat_dir), "--web", "--compare", "/no/such/model", "--port", str(free_port())])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "/no/such/model" in err and "does not exist" in err, err


# ----------------------------------------------------------------------------- a real browser

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install -y chromium); "
                                              "playwright drives the system browser, it downloads none")
def test_a_browser_types_sees_the_answer_stream_in_and_clears(page):
    from playwright.sync_api import sync_playwright

    url, _ = page
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            tab = browser.new_page()
            requests: list[str] = []
            tab.on("request", lambda request: requests.append(request.url))
            tab.goto(url)
            box = tab.get_by_placeholder("Type a message...")
            # every text the answer's bubble shows, recorded by the page itself as the DOM changes
            tab.evaluate("""() => { window.shown = []; new MutationObserver(() => {
                const bots = document.querySelectorAll('[data-testid="bot"]');
                if (bots.length) window.shown.push(bots[bots.length - 1].innerText); })
                .observe(document.body, {subtree: true, childList: true, characterData: true}); }""")
            box.fill("hello there")
            box.press("Enter")
            tab.locator('[data-testid="bot"]').first.wait_for(timeout=60_000)
            tab.get_by_label("Retry").wait_for(timeout=60_000)  # shown once the answer is complete
            assert tab.locator('[data-testid="user"]').all_inner_texts() == ["hello there"]
            [answer] = tab.locator('[data-testid="bot"]').all_inner_texts()
            shown = [text for text in tab.evaluate("window.shown") if text.strip()]
            assert answer.strip()
            assert len(set(shown)) > 2  # it grew in steps: streamed, not shown at once
            tab.get_by_label("Clear").click()
            tab.locator('[data-testid="bot"]').first.wait_for(state="detached", timeout=10_000)
            assert tab.locator('[data-testid="user"]').count() == 0
            assert all(request.startswith((url, "data:", "blob:")) for request in requests), requests  # offline
        finally:
            browser.close()
