"""What `hfllm serve` checks in a request before transformers' handlers see it, and its OpenAI-style errors.

A request transformers would fail on or answer wrongly is answered with `ApiError`'s JSON body and a 4xx: unknown
model, n != 1, a bad stream / temperature / top_p / stop / max_tokens, empty or malformed messages, an unsupported
role, a prompt longer than the context. `batchable` says whether continuous batching decodes a request as `generate()`
would.
"""

import math
from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig

ROLES = ("system", "user", "assistant", "tool")
# request fields that change the decoding: continuous batching cannot honour them per request
DECODING_FIELDS = ("temperature", "top_p", "stop", "frequency_penalty", "logit_bias", "seed", "generation_config")
DEFAULT_MAX_TOKENS = 1024  # transformers serve's default, capped by what is left of the context


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
