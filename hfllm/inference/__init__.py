"""Inference with transformers' own generate() and streamers: `hfllm generate` and `hfllm chat`.

    from hfllm.inference import Decoding, complete
    from hfllm.inference.options import load_for_inference
    model, tokenizer = load_for_inference("runs/sft", "auto")
    [answer] = complete(model, tokenizer, ["What is 2+3?"], Decoding(max_new_tokens=32), chat=True)

Modules: `options.py` (flags, checks, GenerationConfig), `stream.py` (streamed text, stop strings, first-token
clock), `generate.py` (`hfllm generate`), `chat.py` (`hfllm chat`).
"""

from .generate import Completion, complete, stream
from .options import Decoding

__all__ = ["Completion", "Decoding", "complete", "stream"]
