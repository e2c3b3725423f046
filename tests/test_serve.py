"""`hfllm serve`: a real server process on a tiny hfllm model, driven by the official `openai` client.

Answers equal transformers' generate() (greedy), streamed or not, with `usage`; 16 concurrent clients get the
single-client answers through continuous batching; bad requests get an OpenAI-style 4xx and the server keeps serving;
the API key; the concurrency limit; one-line CLI errors. The server starts once for the module.
"""

import asyncio
import importlib
import inspect
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from hfllm.cli import main as cli
from hfllm.inference.request_checks import batchable
from hfllm.inference.serve import Gate

API_KEY = "test-key-123"
WORDS = ["cat", "river", "moon", "apple", "seven", "green", "window", "metre", "stone", "tiger", "paper", "cloud", "music",
         "orange", "bridge", "lemon"]
BATCHED, ALONE = ", continuous batching, stream", ", generate, stream"  # transformers' line per request: its path
QUESTIONS = [f"reverse the word {word}" if i % 2 else f"{word}? {i * 7} + {i}" for i, word in enumerate(WORDS)]


# ----------------------------------------------------------------------------- transformers' serving internals

# What hfllm/inference/transformers_serving.py uses of transformers.cli.serving (internal, renamed in minor releases):
# "module:attribute" -> the parameter names it relies on, in their order (None: the name only has to exist)
UPSTREAM = {
    "model_manager:ModelLoader": (),  # subclassed, built with no argument
    "model_manager:ModelLoader.load_model_and_processor": ("self", "model_id", "on_progress"),  # overridden
    "model_manager:ModelLoader.load_config": ("self", "model_id"),  # overridden
    "model_manager:ModelLoader.load_processor": ("self", "model_id"),  # overridden
    "model_manager:ModelManager": ("loader", "generation_state", "model_timeout", "force_model"),
    "model_manager:ModelManager.get_engine": ("self", "model"),
    "model_manager:ModelManager.is_dead": None,
    "model_manager:EngineClient.use_cb": None,  # replaced for the requests run by generate() alone
    "model_manager:EngineClient.submit": ("self", "function", "args"),
    "model_manager:EngineClient._send_streaming_request": ("self", "method", "args", "response_parser"),
    "model_manager:EngineClient.generate_non_streaming": ("self", "inputs", "generation_kwargs"),
    "model_manager:EngineClient.generate_streaming": ("self", "inputs", "generation_kwargs", "response_parser"),
    "utils:GenerateRunner.submit": ("self", "request_id", "function", "args", "stream"),  # the "submit" request
    "utils:GenerationState": ("continuous_batching", "cb_config"),
    "utils:BaseHandler.get_processor_inputs_from_messages": ("messages", "modality"),
    "utils:BaseHandler.read_queue_outputs": ("queue",),  # reads the stop-cutting queue
    "utils:Modality.LLM": None,
    "utils:prompt_length": ("inputs",),
    "utils:set_serve_log_level": ("level", "log_requests"),
    "chat_completion:ChatCompletionHandler": ("model_manager", "generation_state"),
    "completion:CompletionHandler": ("model_manager", "generation_state"),
    **{f"{module}:{handler}.{method}": parameters
       for module, handler in (("chat_completion", "ChatCompletionHandler"), ("completion", "CompletionHandler"))
       for method, parameters in (("handle_request", ("self", "body", "request_id")),
                                  ("_build_generation_kwargs", ("self", "body", "model_generation_config")),
                                  ("_streaming", ("self", "request_id", "engine", "inputs", "generation_kwargs")),
                                  ("_non_streaming", ("self", "request_id", "engine", "inputs", "generation_kwargs")))},
    "server:build_server": ("model_manager", "chat_handler", "completion_handler", "response_handler",
                            "transcription_handler", "systemone_handler"),
}


@cache
def upstream_serving_problems() -> tuple[str, ...]:
    """What of UPSTREAM is missing or called differently in the installed transformers, then whether the pieces
    behave as the adapter expects: an engine holds its model's config, generation config and tokenizer; a submitted
    function gets (model, processor, *args, streamer=...); a stream is read with get / empty / get_nowait."""
    problems = []
    for name, expected in UPSTREAM.items():
        module, _, path = name.partition(":")
        try:
            found = importlib.import_module(f"transformers.cli.serving.{module}")
            for part in path.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError) as error:
            problems.append(f"{name}: missing ({error})")
            continue
        if expected:
            parameters = list(inspect.signature(found).parameters)
            if [p for p in parameters if p in expected] != list(expected):
                problems.append(f"{name}: parameters {parameters}, expected {list(expected)} among them in order")
    if problems:
        return tuple(problems)
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.utils import BaseHandler, GenerateRunner, GenerationState

    class Loader:
        def load_config(self, model_id):
            return "config", "generation config"

        def load_processor(self, model_id):
            return "tokenizer"

    engine = ModelManager(loader=Loader(), generation_state=GenerationState(), model_timeout=-1).get_engine("m")
    held = tuple(getattr(engine, name, None) for name in ("model_config", "generation_config", "processor"))
    if held != ("config", "generation config", "tokenizer"):
        problems.append(f"EngineClient: holds {held}, not (model_config, generation_config, processor)")
    results = []
    runner = GenerateRunner("model", "tokenizer", lambda ids, tokens, finished: results.extend(finished))
    runner.submit(1, lambda model, processor, x, streamer=None: (model, processor, x, streamer is None), (7,), False)
    deadline = time.monotonic() + 10
    while not results and time.monotonic() < deadline:
        time.sleep(0.01)
    if results != [(1, ("model", "tokenizer", 7, True))]:
        problems.append(f"GenerateRunner.submit: function(model, processor, *args) answered {results}")

    class Stream:  # the queue methods of transformers_serving._StopCutQueue
        def __init__(self, items):
            self.items = deque(items)

        async def get(self):
            return self.items.popleft()

        def empty(self) -> bool:
            return not self.items

        def get_nowait(self):
            return self.items.popleft()

    try:
        read = asyncio.run(BaseHandler.read_queue_outputs(Stream(["a", "b", None])))
    except AttributeError as error:
        read = error
    if read != ["ab", None]:
        problems.append(f"BaseHandler.read_queue_outputs: read {read!r} from a get/empty/get_nowait queue")
    return tuple(problems)


@pytest.mark.upstream  # also in the pre-flight of upstream contracts (pytest -m upstream)
def test_upstream_serving_names():
    """Every name of transformers' serving internals that hfllm serve uses, where the adapter expects it: a rename
    upstream fails here, by name (the server tests then skip)."""
    problems = upstream_serving_problems()
    assert not problems, ("transformers' serving internals changed; update hfllm/inference/transformers_serving.py "
                          "and UPSTREAM:\n" + "\n".join(problems))


@pytest.fixture
def tiny_adapter_dir(tiny_chat_dir, tmp_path):
    """A LoRA adapter (random, non-zero) over `tiny_chat_dir`, saved without a tokenizer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize("fixture", ["tiny_chat_dir", "tiny_adapter_dir", "tiny_llama_shakespeare_gguf"])
def test_loader_reads_each_kind_of_model_as_hfllm_loads_it(fixture, request):
    """The served model's config, generation config and tokenizer, which the API server reads, are those of the model
    that hfllm's loader loads (pickled into the model's process): a folder, a PEFT adapter (merged), a GGUF file."""
    if upstream_serving_problems():
        pytest.skip("transformers' serving internals changed: see test_upstream_serving_names")
    from hfllm.inference.transformers_serving import HfllmModelLoader

    spec = str(request.getfixturevalue(fixture))
    loader = pickle.loads(pickle.dumps(HfllmModelLoader(spec)))
    config, generation_config = loader.load_config(spec)
    tokenizer = loader.load_processor(spec)
    model, loaded_tokenizer = loader.load_model_and_processor(spec)
    assert not model.training and not hasattr(model, "peft_config")  # in eval mode, an adapter merged
    essentials = ("model_type", "vocab_size", "max_position_embeddings", "num_hidden_layers")
    assert [getattr(config, name) for name in essentials] == [getattr(model.config, name) for name in essentials]
    assert generation_config.to_diff_dict() == model.generation_config.to_diff_dict()
    assert tokenizer("To be, or not")["input_ids"] == loaded_tokenizer("To be, or not")["input_ids"]


@pytest.fixture(scope="module")
def server(tiny_chat_dir, tmp_path_factory):
    """`hfllm serve tiny_chat_dir --port 0 --api_key ...` as a subprocess -> (base URL, model name, log file)."""
    if upstream_serving_problems():
        pytest.skip("transformers' serving internals changed: see test_upstream_serving_names")
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="warning")
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "hfllm", "serve", str(tiny_chat_dir), "--port", "0", "--api_key", API_KEY,
             "--max_concurrency", "32"], stdout=out, stderr=subprocess.STDOUT, env=env,
            cwd=Path(__file__).resolve().parents[1])
    try:
        url = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if url is None and (found := re.search(r"on (http://\S+)/v1 ", log.read_text())):
                url = found.group(1)
            if url is not None:
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=5)
                    break
                except OSError:
                    pass
            time.sleep(0.5)
        else:
            pytest.fail(f"the server did not come up:\n{log.read_text()[-3000:]}")
        yield url, str(tiny_chat_dir), log
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert API_KEY not in log.read_text(), "the API key was logged"


@pytest.fixture(scope="module")
def client(server):
    url, _, _ = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_chat_dir):
    """Greedy answers of transformers' generate() on the same checkpoint: (chat(question, n), complete(prompt, n))."""
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)

    def greedy(ids: list[int], max_new_tokens: int) -> tuple[str, int, int]:
        output = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
        new = output[0, len(ids):].tolist()
        return tokenizer.decode(new, skip_special_tokens=True), len(ids), len(new)

    def chat(question: str, max_new_tokens: int):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        return greedy(list(ids), max_new_tokens)

    def complete(prompt: str, max_new_tokens: int):
        return greedy(tokenizer(prompt)["input_ids"], max_new_tokens)

    return chat, complete


def ask(client, model: str, question: str, max_tokens: int = 12, **kwargs) -> str:
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            max_tokens=max_tokens, temperature=0, **kwargs)
    return answer.choices[0].message.content


def post(url: str, path: str, body: bytes | dict, key: str | None = API_KEY) -> tuple[int, dict]:
    """POST raw JSON -> (status, parsed body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"{url}{path}", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# ----------------------------------------------------------------------------- answers


def test_models_lists_the_served_model(client, server):
    assert [model.id for model in client.models.list().data] == [server[1]]


def test_chat_equals_generate_with_usage(client, server, reference):
    answer = client.chat.completions.create(model=server[1], messages=[{"role": "user", "content": QUESTIONS[1]}],
                                            max_tokens=12, temperature=0)
    text, prompt_tokens, completion_tokens = reference[0](QUESTIONS[1], 12)
    assert answer.choices[0].message.content == text and text
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert answer.usage.total_tokens == prompt_tokens + completion_tokens
    assert answer.choices[0].finish_reason == "length"


def test_streamed_chat_equals_non_streamed_with_usage(client, server, reference):
    chunks = list(client.chat.completions.create(model=server[1], messages=[{"role": "user", "content": QUESTIONS[2]}],
                                                 max_tokens=12, temperature=0, stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert len(chunks) > 3 and text == reference[0](QUESTIONS[2], 12)[0]
    assert chunks[-1].usage.completion_tokens == 12  # the last chunk: usage alone, as in OpenAI's API
    assert [chunk for chunk in chunks if chunk.choices][-1].choices[0].finish_reason == "length"


def test_completions_streamed_and_not_equal_generate(client, server, reference):
    expected, prompt_tokens, completion_tokens = reference[1]("To be, or not", 10)
    answer = client.completions.create(model=server[1], prompt="To be, or not", max_tokens=10, temperature=0)
    assert answer.choices[0].text == expected
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    chunks = list(client.completions.create(model=server[1], prompt="To be, or not", max_tokens=10, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == expected
    assert chunks[-1].usage.completion_tokens == completion_tokens


def test_sixteen_concurrent_clients_get_the_single_client_answers(server):
    url, model, log = server

    def new_client():  # one connection pool each: really concurrent clients
        return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=300)

    single = [ask(new_client(), model, question, max_tokens=16) for question in QUESTIONS]
    requests_before = log.read_text().count(BATCHED)
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        concurrent = list(pool.map(lambda q: ask(new_client(), model, q, max_tokens=16), QUESTIONS))
    assert concurrent == single
    assert len(set(single)) > 6, "the tiny model should answer different questions differently"
    assert log.read_text().count(BATCHED) - requests_before == len(QUESTIONS)  # transformers' continuous batching


def test_stop_ends_the_text_before_the_stop_string_streamed_or_not(client, server, reference):
    """Continuous batching would ignore `stop`: such a request is answered by generate(), which halts at it; the text
    ends before the stop string, as in OpenAI's API (transformers serve keeps it), for chat and completions, streamed
    or not."""
    _, model, log = server
    alone_before = log.read_text().count(ALONE)
    full = reference[0](QUESTIONS[3], 16)[0]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    expected = full[: full.index(stop)]
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTIONS[3]}],
                                            max_tokens=16, temperature=0, stop=[stop])
    assert answer.choices[0].message.content == expected and answer.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTIONS[3]}],
                                                 max_tokens=16, temperature=0, stop=stop, stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected

    full = reference[1]("To be, or not", 12)[0]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    expected = full[: full.index(stop)]
    answer = client.completions.create(model=model, prompt="To be, or not", max_tokens=12, temperature=0, stop=[stop])
    assert answer.choices[0].text == expected and answer.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=model, prompt="To be, or not", max_tokens=12, temperature=0,
                                            stop=[stop], stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == expected
    assert log.read_text().count(ALONE) - alone_before == 4  # not continuous batching


def test_batchable_only_when_the_decoding_is_the_models():
    greedy, sampling = GenerationConfig(do_sample=False), GenerationConfig(do_sample=True)
    assert batchable({"max_tokens": 5}, greedy) and batchable({"temperature": 0}, greedy)
    assert not batchable({"temperature": 0}, sampling)
    assert not batchable({"temperature": 0.7}, greedy) and not batchable({"stop": ["x"]}, greedy)


# ----------------------------------------------------------------------------- bad requests


def _chat(model, **fields):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}


BAD_REQUESTS = {  # name -> (path, body from the model name, status, error param)
    "malformed JSON": ("/v1/chat/completions", lambda m: b'{"model": "x", "messages": [', 400, None),
    "not an object": ("/v1/chat/completions", lambda m: b"[1, 2]", 400, None),
    "unknown model": ("/v1/chat/completions", lambda m: _chat("no-such-model"), 404, "model"),
    "max_tokens 0": ("/v1/chat/completions", lambda m: _chat(m, max_tokens=0), 400, "max_tokens"),
    "max_tokens negative": ("/v1/completions", lambda m: {"model": m, "prompt": "hi", "max_tokens": -3}, 400,
                            "max_tokens"),
    "max_tokens beyond the context": ("/v1/chat/completions", lambda m: _chat(m, max_tokens=10_000), 400, "max_tokens"),
    "empty messages": ("/v1/chat/completions", lambda m: {"model": m, "messages": []}, 400, "messages"),
    "unsupported role": ("/v1/chat/completions",
                         lambda m: {"model": m, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
                         "messages[0].role"),
    "prompt longer than the context": ("/v1/completions", lambda m: {"model": m, "prompt": "hello " * 400}, 400,
                                       "prompt"),
    "chat longer than the context": ("/v1/chat/completions",
                                     lambda m: {"model": m, "messages": [{"role": "user", "content": "hi " * 400}]},
                                     400, "messages"),
    "empty prompt": ("/v1/completions", lambda m: {"model": m, "prompt": ""}, 400, "prompt"),
    "unknown field": ("/v1/chat/completions", lambda m: _chat(m, frobnicate=1), 400, None),
    "temperature out of range": ("/v1/chat/completions", lambda m: _chat(m, temperature=-1), 400, "temperature"),
    "empty stop string": ("/v1/chat/completions", lambda m: _chat(m, stop=[""]), 400, "stop"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_openai_error_and_the_server_keeps_serving(server, name):
    url, model, _ = server
    path, body, status, param = BAD_REQUESTS[name]
    code, answer = post(url, path, body(model))
    assert code == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    assert answer["error"]["param"] == param
    assert post(url, "/v1/chat/completions", _chat(model, max_tokens=2))[0] == 200


def test_unknown_model_through_the_openai_client(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(client, "gpt-4o", "hi")


def test_api_key_required(server):
    url, model, _ = server
    for key in (None, "wrong-key"):
        code, answer = post(url, "/v1/chat/completions", _chat(model, max_tokens=2), key=key)
        assert code == 401 and answer["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        ask(openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-key", max_retries=0), model, "hi")
    assert urllib.request.urlopen(f"{url}/health").status == 200  # health checks need no key


def test_other_transformers_routes_are_closed(server):
    url, _, _ = server
    assert post(url, "/reset", {})[0] == 404  # transformers' route that would unload the model
    assert post(url, "/load_model", {"model": "gpt2"})[0] == 404


def test_requests_beyond_max_concurrency_get_429():
    """Gate lets `max_concurrency` generation requests through at once (until their answer ends); more get 429."""
    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def call(gate: Gate) -> int:
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": "/v1/completions", "headers": [], "method": "POST"}
        await gate(scope, None, send)
        return sent[0]["status"]

    async def scenario() -> list[int]:
        gate = Gate(slow_app, api_key=None, max_concurrency=2)
        first = [asyncio.create_task(call(gate)) for _ in range(2)]
        await asyncio.sleep(0.05)
        third = await call(gate)  # both slots busy
        release.set()
        return [third, *(await asyncio.gather(*first)), await call(gate)]

    assert asyncio.run(scenario()) == [429, 200, 200, 200]


# ----------------------------------------------------------------------------- command line


def run(capsys, *argv) -> tuple[int, str]:
    code = cli(["serve", *map(str, argv)])
    return code, capsys.readouterr().err


def test_server_vllm_refused_without_vllm_and_gpu(capsys, tiny_chat_dir):
    code, err = run(capsys, tiny_chat_dir, "--server", "vllm")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--server vllm needs vLLM and a CUDA GPU; missing here:" in err and "a CUDA GPU" in err


def test_engine_is_a_deprecated_alias_of_server(capsys):
    """`--engine` (until the next release) parses as `--server` and prints one line naming `--server`."""
    from hfllm.inference.serve import _parser

    new = _parser("hfllm serve").parse_args(["m", "--server", "vllm"])
    assert capsys.readouterr().err == ""
    old = _parser("hfllm serve").parse_args(["m", "--engine", "vllm"])
    assert vars(old) == vars(new)
    assert capsys.readouterr().err == ("hfllm serve: --engine is deprecated and will be removed in the next release; "
                                       "use --server\n")


def test_port_in_use_is_one_line(capsys, tiny_chat_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run(capsys, tiny_chat_dir, "--port", port)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err


def test_a_load_error_in_the_models_process_is_one_line(tiny_chat_dir, tmp_path, capfd):
    """MODEL loads in transformers' model process: hfllm's one-line error there (truncated weights) reaches the command
    line as one line, exit code 2, no traceback."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_chat_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code = cli(["serve", str(broken), "--port", "0"])
    err = capfd.readouterr().err  # this process's and the model process's
    lines = [line for line in err.splitlines()  # less the warning of bitsandbytes' kernels (imported with peft) under
             if line.strip() and not line.startswith("Skipping publisher trust check")]  # HF_HUB_OFFLINE
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"hfllm serve: error: could not serve '{broken}': could not load model"), lines[0]


@pytest.mark.parametrize("argv, message", [
    (["no/such/model-dir/"], "does not exist"),
    (["{model}", "--max_concurrency", "0"], "--max_concurrency must be at least 1"),
    (["{model}", "--port", "70000"], "--port must be in 0..65535"),
    (["{model}", "--dtype", "float8"], "invalid choice: 'float8'"),
    (["{model}", "--server", "tgi"], "invalid choice: 'tgi'"),
    ([], "the following arguments are required: model"),
])
def test_bad_command_line_is_one_line(capsys, tiny_chat_dir, argv, message):
    code, err = run(capsys, *[arg.format(model=tiny_chat_dir) for arg in argv])
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err
