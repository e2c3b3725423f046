"""transformers serve's internals (`transformers.cli.serving`, not a public API) as `hfllm serve` uses them: the one
module that names them. tests/test_serve.py::test_upstream_serving_names checks every name used here.

    server = TransformersServer(HfllmModelLoader(spec, dtype="auto"), spec, cb_config)   # the model's process started
    app = server.app(lambda route, batched, alone: ...)      # transformers' FastAPI app, chat and completions only

transformers 5.25 runs each model in a process of its own (spawned), loaded there by a pickled `ModelLoader`; the API
server keeps only the model's config, generation config and tokenizer. `HfllmModelLoader` loads the model the hfllm
way (`hfllm.checkpoint.load`) in that process.
"""

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, PretrainedConfig
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.completion import CompletionHandler
from transformers.cli.serving.model_manager import ModelLoader, ModelManager
from transformers.cli.serving.server import build_server
from transformers.cli.serving.utils import BaseHandler, GenerationState, Modality, prompt_length, set_serve_log_level
from transformers.utils import logging as transformers_logging

from ..checkpoint import check_gguf, load, spec_kind
from ..errors import HfllmError, debug, first_line
from .stream import StopFilter, cut_at_stop

# ----------------------------------------------------------------------------- the model, loaded the hfllm way


class HfllmModelLoader(ModelLoader):
    """transformers' model loader for one MODEL spec (any that `hfllm.checkpoint.load` takes; an adapter merged).
    The model's process loads the model with it; the API server reads the config and tokenizer with it. The server is
    pinned to this one model, so the model ids transformers passes are not needed."""

    def __init__(self, spec: str, *, dtype: str | torch.dtype = "auto", quantization_config: Any = None):
        super().__init__()
        self.spec, self.weights_dtype, self.quantization_config = spec, dtype, quantization_config

    def load_model_and_processor(self, model_id: str, on_progress: Callable | None = None) -> tuple[Any, Any]:
        transformers_logging.disable_progress_bar()
        try:
            return load(self.spec, dtype=self.weights_dtype, merge_adapter=True,
                        quantization_config=self.quantization_config)
        except HfllmError:
            if not debug():  # the process ends with this error, which the API server prints as one line: no traceback
                logging.disable(logging.CRITICAL)
            raise

    def load_config(self, model_id: str) -> tuple[PretrainedConfig, GenerationConfig]:
        from transformers import AutoConfig

        source, kwargs = self._source("config")
        try:
            config = AutoConfig.from_pretrained(source, **kwargs)
            try:  # as `from_pretrained` does: the folder's generation config, else the model config's
                generation_config = GenerationConfig.from_pretrained(source)
            except OSError:
                generation_config = GenerationConfig.from_model_config(config)
        except (OSError, ValueError) as error:
            raise HfllmError(f"could not read the config of '{self.spec}': {first_line(error)}") from None
        return config, generation_config

    def load_processor(self, model_id: str) -> Any:
        from transformers import AutoTokenizer

        source, kwargs = self._source("tokenizer")
        try:
            return AutoTokenizer.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as error:
            raise HfllmError(f"could not load the tokenizer of '{self.spec}': {first_line(error)}") from None

    def _source(self, what: str) -> tuple[str, dict]:
        """Where `hfllm.checkpoint.load` reads the config or the tokenizer of the spec: (path or Hub id, kwargs)."""
        path, kind = Path(self.spec), spec_kind(self.spec)
        if kind == "gguf":
            check_gguf(path)
            return str(path.parent), {"gguf_file": path.name}
        if kind == "adapter":
            from peft import PeftConfig

            base = PeftConfig.from_pretrained(self.spec).base_model_name_or_path
            if not base:
                raise HfllmError(f"adapter '{self.spec}' names no base model; merge it first (hfllm merge)")
            own_tokenizer = what == "tokenizer" and (path / "tokenizer_config.json").is_file()
            return (self.spec if own_tokenizer else base), {}
        return self.spec, {}


def chat_template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages as transformers' chat handler hands them to the chat template (text models)."""
    return BaseHandler.get_processor_inputs_from_messages(messages, Modality.LLM)


# ----------------------------------------------------------------------------- the server


class TransformersServer:
    """transformers' server pinned to one model, whose process starts (and loads the model) here; never unloaded.
    Continuous batching with `cb_config`; transformers logs a line per request at `log_level` ("info": which path,
    continuous batching or generate, each request took)."""

    def __init__(self, loader: HfllmModelLoader, name: str, cb_config: ContinuousBatchingConfig, *,
                 log_level: int = transformers_logging.INFO):
        set_serve_log_level(log_level, log_requests=True)  # before the start: the model's process takes the level
        self.state = GenerationState(continuous_batching=True, cb_config=cb_config)
        try:
            self.manager = ModelManager(loader=loader, generation_state=self.state, model_timeout=-1, force_model=name)
        except RuntimeError as error:  # raised from the model's process: "<ErrorType>: <message>"
            raise HfllmError(f"could not serve '{name}': {first_line(error).removeprefix('HfllmError: ')}") from None
        engine = self.manager.get_engine(name)
        self.config, self.generation_config, self.tokenizer = engine.model_config, engine.generation_config, \
            engine.processor

    @property
    def model_died(self) -> bool:
        """Whether the model's process (or its continuous batching) died: the server should stop."""
        return self.manager.is_dead

    def app(self, endpoint: Callable[[str, Any, Any], Any]):
        """transformers' FastAPI app with chat and completions only; each route's handler is
        `endpoint(route, batched, alone)`, given transformers' handler for the route in two forms, both answering as
        OpenAI's API does: `batched` (continuous batching) and `alone` (`generate()` on its own, for a decoding
        continuous batching cannot honour). The app's other routes answer 'not available'."""
        alone_manager = _GenerateAloneManager(self.manager)
        handlers = {}
        for route, handler_class in (("chat", ChatCompletionHandler), ("completion", CompletionHandler)):
            handler_class = _openai_semantics(handler_class)
            handlers[route] = endpoint(route, handler_class(model_manager=self.manager, generation_state=self.state),
                                       handler_class(model_manager=alone_manager, generation_state=self.state))
        return build_server(self.manager, handlers["chat"], completion_handler=handlers["completion"],
                            response_handler=None, transcription_handler=None, systemone_handler=None)


# ----------------------------------------------------------------------------- generate() on its own


def generate_alone(model: Any, processor: Any, inputs: dict, generation_kwargs: dict,
                   streamer: Any = None) -> list[int]:
    """Runs in the model's process (transformers' `EngineClient.submit`): `model.generate()` for one request, with all
    its decoding settings; returns the new tokens (streamed to `streamer` as they come when it is given)."""
    kwargs = {name: value for name, value in generation_kwargs.items() if value is not None}
    if (seed := kwargs.pop("seed", None)) is not None:
        torch.manual_seed(seed)
    inputs = {name: value.to(model.device) for name, value in inputs.items()}
    sequences = model.generate(**inputs, **kwargs, tokenizer=processor, streamer=streamer)
    return sequences[0, inputs["input_ids"].shape[-1]:].tolist()


class _GenerateAlone:
    """transformers' engine of the model (`EngineClient`), its requests run by `generate_alone` in the model's process
    instead of continuous batching."""

    use_cb = False  # prompts come as tensors, and transformers' request line says "generate"

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    async def generate_non_streaming(self, inputs: dict, generation_kwargs: dict) -> tuple[str, int, list[int]]:
        generated = await self.engine.submit(generate_alone, dict(inputs), generation_kwargs)
        return self.engine.processor.decode(generated, skip_special_tokens=True), prompt_length(inputs), generated

    def generate_streaming(self, inputs: dict, generation_kwargs: dict, response_parser: Any = None):
        # `submit_streaming` without its private form would drop the response parser (tool calls, reasoning)
        return self.engine._send_streaming_request("submit", (generate_alone, (dict(inputs), generation_kwargs)),
                                                   response_parser)


class _GenerateAloneManager:
    """The model manager as handlers see it, its engine running each request through `generate_alone`."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def get_engine(self, model: str | None) -> _GenerateAlone:
        return _GenerateAlone(self.manager.get_engine(model))


# ----------------------------------------------------------------------------- OpenAI's semantics


def _openai_semantics(handler_class: type) -> type:
    """A transformers handler class that answers as OpenAI's API does where transformers differs: temperature > 0
    (or top_p alone) samples (transformers keeps the model's do_sample, so a greedy model answers greedily at any
    temperature), and the text ends before the `stop` string (transformers keeps it), streamed or not."""

    class Handler(handler_class):
        def _build_generation_kwargs(self, body: dict, model_generation_config: GenerationConfig) -> dict:
            kwargs = super()._build_generation_kwargs(body, model_generation_config)
            temperature = body.get("temperature")
            if (temperature or 0) > 0 or (temperature is None and body.get("top_p") is not None):
                kwargs["do_sample"] = True
            return kwargs

        def _streaming(self, request_id, engine, inputs, generation_kwargs, *args, **kwargs):
            return super()._streaming(request_id, _stop_cutting(engine, generation_kwargs), inputs, generation_kwargs,
                                      *args, **kwargs)

        async def _non_streaming(self, request_id, engine, inputs, generation_kwargs, *args, **kwargs):
            return await super()._non_streaming(request_id, _stop_cutting(engine, generation_kwargs), inputs,
                                                generation_kwargs, *args, **kwargs)

    Handler.__name__ = Handler.__qualname__ = handler_class.__name__
    return Handler


def _stop_cutting(engine, generation_kwargs: dict):
    """`engine`, its text cut before the first stop string of the request (`stop_strings`), if it has any."""
    stop = generation_kwargs.get("stop_strings")
    return _StopCutEngine(engine, [stop] if isinstance(stop, str) else list(stop)) if stop else engine


class _StopCutEngine:
    """An engine whose text (whole, or streamed through an asyncio queue) ends before the first stop string; the
    cutting is `hfllm.inference.stream`'s, as in `hfllm generate`."""

    def __init__(self, engine, stop: list[str]):
        self.engine, self.stop = engine, stop

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    async def generate_non_streaming(self, *args, **kwargs):
        text, input_len, generated_ids = await self.engine.generate_non_streaming(*args, **kwargs)
        return cut_at_stop(text, self.stop)[0], input_len, generated_ids

    def generate_streaming(self, *args, **kwargs):
        queue, streamer = self.engine.generate_streaming(*args, **kwargs)
        return _StopCutQueue(queue, StopFilter(self.stop)), streamer


class _StopCutQueue:
    """The `get` / `empty` / `get_nowait` of transformers' text queue, with text pieces passed through a `StopFilter`
    (a tail that could begin a stop string is held back; nothing after a stop). Other items (the end, errors, tool
    calls) pass as they are."""

    def __init__(self, queue: asyncio.Queue, stop_filter: StopFilter):
        self.queue, self.filter, self.ready = queue, stop_filter, deque()

    def _take(self, item) -> None:
        if item is None:  # the end: what was held back, then the end
            self.ready.extend(piece for piece in (self.filter.flush(), None) if piece != "")
        elif type(item) is str:
            if piece := self.filter.feed(item):
                self.ready.append(piece)
        else:
            self.ready.append(item)

    async def get(self):
        while not self.ready:
            self._take(await self.queue.get())
        return self.ready.popleft()

    def empty(self) -> bool:
        while not self.ready and not self.queue.empty():
            self._take(self.queue.get_nowait())
        return not self.ready

    def get_nowait(self):
        if self.empty():
            raise asyncio.QueueEmpty
        return self.ready.popleft()
