"""Inference over one engine interface: transformers' generate() or llama.cpp. `hfllm generate` and `hfllm chat`.

    from hfllm.inference import ChatSession, Decoding, TransformersEngine, complete
    from hfllm.inference.options import load_for_inference
    model, tokenizer = load_for_inference("runs/sft", "auto")
    [answer] = complete(model, tokenizer, ["What is 2+3?"], Decoding(max_new_tokens=32), chat=True)
    session = ChatSession(TransformersEngine(model, tokenizer), Decoding(max_new_tokens=64))

Modules, lowest first: `options.py` (flags, checks, GenerationConfig), `stream.py` (streamed text, stop strings,
first-token clock), `engine.py` (the `Engine` interface and `Completion`), `transformers_engine.py` and
`llama_cpp_engine.py` (its two implementations), `session.py` (`ChatSession` over any engine), then the commands:
`generate.py` (`hfllm generate`), `chat.py` (`hfllm chat`), `web.py` (`--web`), `serve.py` (`hfllm serve`).
"""

from .engine import Completion, Engine
from .options import Decoding
from .session import ChatSession
from .transformers_engine import TransformersEngine, complete, stream

__all__ = ["ChatSession", "Completion", "Decoding", "Engine", "TransformersEngine", "complete", "stream"]
