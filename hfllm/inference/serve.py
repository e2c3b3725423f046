"""`hfllm serve MODEL`: an OpenAI-compatible HTTP server on transformers' own serving stack.

    hfllm serve runs/sft --port 8000 --api_key KEY          # /v1/models, /v1/chat/completions, /v1/completions, /health
    hfllm serve runs/sft --engine vllm                      # vLLM on the exported native checkpoint (CUDA GPU)

The routes, streaming (SSE), `usage` counts and continuous batching are transformers' (`transformers serve`,
`transformers/cli/serving/`, reached only through `transformers_serving.py`); the model runs in transformers' model
process, loaded there by `hfllm.checkpoint.load`. hfllm adds what they lack:
- requests checked first, answered with an OpenAI-style JSON error and a 4xx (malformed JSON, unknown model,
  max_tokens <= 0 or beyond the context, empty messages, unsupported role, prompt longer than the context);
- an API key (401 without it), at most `--max_concurrency` requests at once (429 beyond), only the OpenAI routes;
- a paged KV cache sized for a CPU (transformers sizes it from free GPU memory, on a CPU from the whole RAM);
- temperature > 0 samples, and the text ends before a `stop` string (streamed or not), as in OpenAI's API;
- `usage` in a streamed answer's last chunk unless the request's `stream_options` says otherwise;
- continuous batching decodes the requests of a batch with the model's generation config, so a request that changes
  the decoding (temperature, top_p, stop, seed, ...) runs through `generate()` on its own, in the model's process.
"""

import hashlib
import hmac
import importlib.util
import json
import logging
import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, PretrainedConfig

from ..errors import HfllmError
from .options import Parser, add_model_arguments, quantization_from_args

ROLES = ("system", "user", "assistant", "tool")
GENERATION_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
OPEN_ROUTES = ("/health",)  # answered without the API key
ROUTES = (*GENERATION_ROUTES, "/v1/models", *OPEN_ROUTES)
# request fields that change the decoding: continuous batching cannot honour them per request
DECODING_FIELDS = ("temperature", "top_p", "stop", "frequency_penalty", "logit_bias", "seed", "generation_config")
DEFAULT_MAX_TOKENS = 1024  # transformers serve's default, capped by what is left of the context
CPU_KV_CACHE_BYTES = 1 << 30  # the paged KV cache on a CPU: at most 1 GiB
CPU_MAX_BATCH_TOKENS = 512  # tokens per forward pass (long prompts are prefilled in chunks)


# ----------------------------------------------------------------------------- OpenAI-style errors


class ApiError(Exception):
    """A bad request: answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self):
        from fastapi.responses import JSONResponse

        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


# ----------------------------------------------------------------------------- request checks


@dataclass
class Served:
    """What a request is checked against: the model's name, its tokenizer, its context window."""

    name: str
    tokenizer: Any
    context: int | None
    default_decoding: GenerationConfig


def check_request(route: str, body: dict, served: Served) -> None:
    """Raise `ApiError` (4xx) for a request transformers' handlers would fail on or answer wrongly; fill in
    `max_tokens` when it is absent (what is left of the context, at most DEFAULT_MAX_TOKENS), and ask for `usage` in
    a streamed answer's last chunk unless `stream_options` says otherwise."""
    model = body.get("model")
    if model is not None and model != served.name:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{served.name}' (GET /v1/models)",
                       param="model", code="model_not_found")
    if body.get("n") not in (None, 1):
        raise ApiError(400, f"n must be 1 (got {body['n']!r}); send several requests instead", param="n")
    if body.get("stream") not in (None, True, False):
        raise ApiError(400, f"stream must be true or false (got {body['stream']!r})", param="stream")
    if body.get("stream") and body.get("stream_options") is None:
        body["stream_options"] = {"include_usage": True}
    for name, low, high in (("temperature", 0, 2), ("top_p", 0, 1)):
        value = body.get(name)
        if value is not None and not (_is_number(value) and low <= value <= high and (name != "top_p" or value > 0)):
            raise ApiError(400, f"{name} must be a number in {'(' if name == 'top_p' else '['}{low}, {high}] "
                           f"(got {value!r})", param=name)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"stop must be a non-empty string or a list of them (got {stop!r})", param="stop")
    limit_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(limit_field)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ApiError(400, f"{limit_field} must be an integer >= 1 (got {max_tokens!r})", param=limit_field)

    prompt_tokens = len(_chat_prompt_ids(body, served) if route == "chat" else _completion_prompt_ids(body, served))
    if served.context is None:
        return
    if prompt_tokens >= served.context:
        raise ApiError(400, f"This model's maximum context length is {served.context} tokens, but the prompt is "
                       f"{prompt_tokens} tokens; shorten the prompt", param="messages" if route == "chat" else "prompt",
                       code="context_length_exceeded")
    if max_tokens is not None and prompt_tokens + max_tokens > served.context:
        raise ApiError(400, f"This model's maximum context length is {served.context} tokens, but {prompt_tokens} "
                       f"prompt tokens + {limit_field}={max_tokens} is {prompt_tokens + max_tokens}; lower "
                       f"{limit_field} to at most {served.context - prompt_tokens}", param=limit_field,
                       code="context_length_exceeded")
    if max_tokens is None:
        body["max_tokens"] = min(DEFAULT_MAX_TOKENS, served.context - prompt_tokens)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _chat_prompt_ids(body: dict, served: Served) -> list[int]:
    """The chat prompt's token ids, rendered as transformers' handler renders it; 400 on bad messages."""
    from .transformers_serving import chat_template_messages

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{index}] must be an object with role and content", param=f"messages[{index}]")
        if message.get("role") not in ROLES:
            raise ApiError(400, f"messages[{index}].role {message.get('role')!r} is not supported; use one of "
                           f"{', '.join(ROLES)}", param=f"messages[{index}].role")
        content = message.get("content")
        parts_ok = isinstance(content, list) and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content)
        if not (isinstance(content, str) or parts_ok or (content is None and message.get("tool_calls"))):
            raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts",
                           param=f"messages[{index}].content")
    if not getattr(served.tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template; use /v1/completions with a plain prompt",
                       param="messages")
    try:
        rendered = served.tokenizer.apply_chat_template(
            chat_template_messages(messages), add_generation_prompt=True,
            tools=body.get("tools"), tokenize=True, return_dict=True)
    except Exception as error:  # a template may raise anything (jinja's TemplateError, a template's own checks)
        raise ApiError(400, f"the chat template rejected these messages: {error}", param="messages") from None
    return list(rendered["input_ids"])


def _completion_prompt_ids(body: dict, served: Served) -> list[int]:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string", param="prompt")
    return served.tokenizer(prompt)["input_ids"]


def batchable(body: dict, default: GenerationConfig) -> bool:
    """Whether continuous batching decodes this request as `generate()` would: it applies the model's generation
    config to every request and honours only max_tokens and, where the model's config sets them, temperature, top_k
    and top_p per request (transformers 5.25)."""
    given = {name for name in DECODING_FIELDS if body.get(name) is not None}
    return not given or (given == {"temperature"} and body["temperature"] == 0 and not default.do_sample)


# ----------------------------------------------------------------------------- the app


class Gate:
    """ASGI middleware in front of transformers' app: only the OpenAI routes, the API key, and at most
    `max_concurrency` generation requests at once (held until a streamed answer ends)."""

    def __init__(self, app, *, api_key: str | None, max_concurrency: int):
        self.app, self.api_key, self.max_concurrency = app, api_key, max_concurrency
        self.active = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/") or "/"
        error = None
        if path not in ROUTES:
            error = ApiError(404, f"no route {path}; this server answers {', '.join(ROUTES)}", code="not_found")
        elif self.api_key and path not in OPEN_ROUTES and not self._authorized(scope):
            error = ApiError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                             code="invalid_api_key")
        elif path in GENERATION_ROUTES and self.active >= self.max_concurrency:
            error = ApiError(429, f"the server is busy with {self.active} requests (--max_concurrency); retry "
                             "shortly", kind="rate_limit_error", code="too_many_requests")
        if error is not None:
            return await error.response()(scope, receive, send)
        counted = path in GENERATION_ROUTES
        self.active += counted
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= counted

    def _authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())


class Endpoint:
    """One generation route: the request checked, then handed to transformers' handler, batched when it can be."""

    def __init__(self, route: str, served: Served, batched, alone):
        self.route, self.served, self.batched, self.alone = route, served, batched, alone

    async def handle_request(self, body: dict, request_id: str):
        check_request(self.route, body, self.served)
        handler = self.batched if batchable(body, self.served.default_decoding) else self.alone
        return await handler.handle_request(body, request_id)


def batching_config(config: PretrainedConfig, dtype: torch.dtype, on_cpu: bool,
                    max_concurrency: int) -> ContinuousBatchingConfig:
    """Continuous batching for up to `max_concurrency` requests of a model (`config`, weights in `dtype`). On a GPU
    transformers sizes the paged cache from free memory; on a CPU it would take 90% of the RAM, so it holds
    max_concurrency full contexts, at most 1 GiB."""
    if not on_cpu:
        return ContinuousBatchingConfig(max_requests_per_batch=max_concurrency)
    config = config.get_text_config()
    context = getattr(config, "max_position_embeddings", None) or 4096
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    bytes_per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * dtype.itemsize  # keys + values
    tokens = min(max_concurrency * context, max(CPU_KV_CACHE_BYTES // bytes_per_token, context))
    page_size = ContinuousBatchingConfig().page_size
    return ContinuousBatchingConfig(num_blocks=math.ceil(tokens / page_size), max_batch_tokens=CPU_MAX_BATCH_TOKENS,
                                    max_requests_per_batch=max_concurrency)


def weights_dtype(dtype: str | torch.dtype, config: PretrainedConfig) -> torch.dtype:
    """The dtype `hfllm.checkpoint.load(dtype=dtype)` gives the weights: `dtype`, or for "auto" the config's (float32
    when it names none)."""
    if dtype == "auto":
        dtype = getattr(config.get_text_config(), "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def build_app(spec: str, *, dtype: str | torch.dtype = "auto", quantization_config: Any = None,
              api_key: str | None = None, max_concurrency: int = 64, log_level: str = "info"):
    """(The FastAPI app of transformers serve for MODEL behind `Gate` and `check_request`, transformers' server). The
    model's process starts here and loads MODEL with `hfllm.checkpoint.load`; continuous batching starts there too
    (its warm-up included), not on the first request."""
    from fastapi import HTTPException
    from fastapi.exceptions import RequestValidationError

    from .transformers_serving import HfllmModelLoader, TransformersServer

    loader = HfllmModelLoader(spec, dtype=dtype, quantization_config=quantization_config)
    config = loader.load_config(spec)[0]
    on_cpu = quantization_config is None or not torch.cuda.is_available()  # where hfllm.checkpoint.load puts it
    cb_config = batching_config(config, weights_dtype(dtype, config), on_cpu, max_concurrency)
    server = TransformersServer(loader, spec, cb_config, log_level=logging.getLevelName(log_level.upper()))
    context = getattr(server.config.get_text_config(), "max_position_embeddings", None)
    served = Served(spec, server.tokenizer, context, server.generation_config)
    app = server.app(lambda route, batched, alone: Endpoint(route, served, batched, alone))

    @app.exception_handler(ApiError)
    async def _api_error(_request, error: ApiError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_request, error: RequestValidationError):
        problems = error.errors()
        if any(problem.get("type") == "json_invalid" for problem in problems):
            message = f"the request body is not valid JSON: {problems[0].get('ctx', {}).get('error', 'parse error')}"
        else:
            message = "the request body must be a JSON object, sent with Content-Type: application/json"
        return ApiError(400, message).response()

    @app.exception_handler(HTTPException)
    async def _http_error(_request, error: HTTPException):  # raised inside transformers' handlers
        status = 400 if error.status_code == 422 else error.status_code
        return ApiError(status, str(error.detail)).response()

    @app.exception_handler(ValueError)
    async def _bad_value(_request, error: ValueError):  # transformers' handlers: a value the request cannot have
        return ApiError(400, str(error)).response()

    app.add_middleware(Gate, api_key=api_key, max_concurrency=max_concurrency)
    return app, server


# ----------------------------------------------------------------------------- the command


def main(argv: list[str], prog: str) -> int:
    """`hfllm serve MODEL [--host H] [--port P] [--api_key KEY] [--max_concurrency N] [--dtype D] [--engine E]`."""
    args = _parser(prog).parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise HfllmError(f"--port must be in 0..65535 (got {args.port})")
    if args.max_concurrency < 1:
        raise HfllmError(f"--max_concurrency must be at least 1 (got {args.max_concurrency})")
    api_key = args.api_key or os.environ.get("HFLLM_API_KEY") or None
    if args.engine == "vllm":
        return serve_vllm(args.model, args.host, args.port, api_key, args.max_concurrency, args.dtype)
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise HfllmError("hfllm serve needs fastapi, uvicorn and openai: pip install 'hfllm[serve]'")
    import uvicorn

    from ..checkpoint import spec_kind

    spec_kind(args.model)  # one line when MODEL names nothing, before the port is taken
    listener = _listen(args.host, args.port)
    app, server = build_app(args.model, dtype=args.dtype if args.dtype == "auto" else getattr(torch, args.dtype),
                            quantization_config=quantization_from_args(args), api_key=api_key,
                            max_concurrency=args.max_concurrency, log_level=args.log_level)
    host, port = listener.getsockname()[:2]
    print(f"serving '{args.model}' on http://{host}:{port}/v1 (OpenAI API; continuous batching; up to "
          f"{args.max_concurrency} requests at once{'; API key required' if api_key else ''})", file=sys.stderr,
          flush=True)

    async def stop_if_the_model_died() -> None:
        uvicorn_server.should_exit |= server.model_died

    uvicorn_server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_notify=5,
                                                   callback_notify=stop_if_the_model_died))
    uvicorn_server.run(sockets=[listener])
    if server.model_died:
        print("hfllm serve: the model's process died (see the error above); the server stopped", file=sys.stderr)
        return 1
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it); one line when the port is taken."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        raise HfllmError(f"--host {host} is not an address of this machine ({error.strerror}); try 127.0.0.1 or "
                         "0.0.0.0") from None
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise HfllmError(f"cannot listen on {host}:{port}: {error.strerror}; choose another --port (or stop the "
                         "program using it)") from None
    return listener


def serve_vllm(spec: str, host: str, port: int, api_key: str | None, max_concurrency: int, dtype: str) -> int:
    """Run `vllm serve` on MODEL's native transformers checkpoint (exported from hfllm's family when needed)."""
    missing = [what for what, present in (("the vllm package (pip install vllm)", importlib.util.find_spec("vllm")),
                                          ("a CUDA GPU", torch.cuda.is_available())) if not present]
    if missing:
        raise HfllmError(f"--engine vllm needs vLLM and a CUDA GPU; missing here: {' and '.join(missing)}; use "
                         "--engine transformers")
    checkpoint = native_checkpoint(spec)
    command = ["vllm", "serve", checkpoint, "--served-model-name", spec, "--host", host, "--port", str(port),
               "--max-num-seqs", str(max_concurrency), "--dtype", dtype]
    env = dict(os.environ, **({"VLLM_API_KEY": api_key} if api_key else {}))  # not on the command line
    print(f"serving '{spec}' with vLLM from {checkpoint}", file=sys.stderr, flush=True)
    return subprocess.call(command, env=env)


def native_checkpoint(spec: str) -> str:
    """A checkpoint vLLM reads: MODEL itself when it is a native folder or a Hub id, else `hfllm export --to
    transformers` of it (adapters merged, GGUF dequantized) in ~/.cache/hfllm/vllm."""
    from ..checkpoint import spec_kind
    from ..models.convert import export, load_as_native

    kind = spec_kind(spec)
    is_hfllm_folder = kind == "folder" and json.loads((Path(spec) / "config.json").read_text()).get("model_type") == "hfllm"
    if kind == "hub" or (kind == "folder" and not is_hfllm_folder):
        return spec
    cache = Path(os.environ.get("HFLLM_CACHE", Path.home() / ".cache" / "hfllm")) / "vllm"
    source = Path(spec).resolve()
    out = cache / f"{source.name}-{hashlib.sha1(str(source).encode()).hexdigest()[:8]}"
    if out.is_dir():
        return str(out)
    if is_hfllm_folder:
        return str(export(spec, out))
    from ..checkpoint import atomic_output

    native, tokenizer = load_as_native(spec)
    with atomic_output(out) as tmp:
        native.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(out)


def _parser(prog: str) -> Parser:
    parser = Parser(prog=prog, description="Serve a model over an OpenAI-compatible HTTP API (transformers serve, "
                    "continuous batching).")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--api_key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $HFLLM_API_KEY; none)")
    parser.add_argument("--max_concurrency", type=int, default=64,
                        help="generation requests at once; more get 429 (default 64)")
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                        help="transformers (CPU or GPU, continuous batching) or vllm (CUDA GPU, the exported checkpoint)")
    parser.add_argument("--log_level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                        help="uvicorn's log level (info: one line per request; keys are never logged)")
    return parser
