"""`hfllm serve MODEL`: an OpenAI-compatible HTTP server on transformers' own serving stack.

    hfllm serve runs/sft --port 8000 --api_key KEY          # /v1/models, /v1/chat/completions, /v1/completions, /health
    hfllm serve runs/sft --server vllm                      # vLLM on the exported native checkpoint (CUDA GPU;
                                                            # vllm_launcher.py)

The routes, streaming (SSE), `usage` counts and continuous batching are transformers' (`transformers serve`,
`transformers/cli/serving/`, reached only through `transformers_serving.py`); the model runs in transformers' model
process, loaded there by `hfllm.checkpoint.load`. hfllm adds what they lack:
- requests checked first, answered with an OpenAI-style JSON error and a 4xx (malformed JSON, unknown model,
  max_tokens <= 0 or beyond the context, empty messages, unsupported role, prompt longer than the context;
  `request_checks.py`);
- an API key (401 without it), at most `--max_concurrency` requests at once (429 beyond), only the OpenAI routes;
- a paged KV cache sized for a CPU (transformers sizes it from free GPU memory, on a CPU from the whole RAM);
- temperature > 0 samples, and the text ends before a `stop` string (streamed or not), as in OpenAI's API;
- `usage` in a streamed answer's last chunk unless the request's `stream_options` says otherwise;
- continuous batching decodes the requests of a batch with the model's generation config, so a request that changes
  the decoding (temperature, top_p, stop, seed, ...) runs through `generate()` on its own, in the model's process.
"""

import hmac
import logging
import math
import os
import socket
import sys
from typing import Any

import torch
from transformers import ContinuousBatchingConfig, PretrainedConfig

from ..errors import HfllmError
from .options import Parser, add_model_arguments, quantization_from_args
from .request_checks import ApiError, Served, batchable, check_request

SERVERS = ("transformers", "vllm")  # `--server`: what answers the HTTP API

GENERATION_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
OPEN_ROUTES = ("/health",)  # answered without the API key
ROUTES = (*GENERATION_ROUTES, "/v1/models", *OPEN_ROUTES)
CPU_KV_CACHE_BYTES = 1 << 30  # the paged KV cache on a CPU: at most 1 GiB
CPU_MAX_BATCH_TOKENS = 512  # tokens per forward pass (long prompts are prefilled in chunks)


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
    """`hfllm serve MODEL [--host H] [--port P] [--api_key KEY] [--max_concurrency N] [--dtype D] [--server S]`."""
    args = _parser(prog).parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise HfllmError(f"--port must be in 0..65535 (got {args.port})")
    if args.max_concurrency < 1:
        raise HfllmError(f"--max_concurrency must be at least 1 (got {args.max_concurrency})")
    api_key = args.api_key or os.environ.get("HFLLM_API_KEY") or None
    if args.server == "vllm":
        from .vllm_launcher import serve_vllm

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
    parser.add_argument("--server", choices=SERVERS, default="transformers",
                        help="transformers (CPU or GPU, continuous batching) or vllm (CUDA GPU, the exported checkpoint)")
    parser.add_deprecated_alias("--engine", "--server", choices=SERVERS)
    parser.add_argument("--log_level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                        help="uvicorn's log level (info: one line per request; keys are never logged)")
    return parser
