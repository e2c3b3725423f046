"""The decoding engine: what `hfllm generate`, `hfllm chat` and its web page need from a model, whatever decodes it.

    engine = TransformersEngine(model, tokenizer)          # transformers' generate() (transformers_engine.py)
    engine = open_llama_cpp(args, threads)                  # llama.cpp on a GGUF file (llama_cpp_engine.py)
    engine.render(chat_messages("What is 2+3?"))            # the chat template, ready for the answer
    engine.count_tokens(text, chat=True)
    completion = yield from engine.stream(prompt, rendered, decoding, chat=True)   # text pieces, then a Completion
    engine.complete(prompts, decoding, chat=True)           # a Completion per prompt

A `ChatSession` (session.py) holds a conversation over any engine.
"""

from abc import ABC, abstractmethod
from collections.abc import Generator
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from ..generation import chat_messages
from .options import Decoding


@dataclass
class Completion:
    """One generated sequence: its text (cut at a stop string) and what it cost."""

    prompt: str
    rendered_prompt: str  # what the model read: the prompt, or the chat template applied to it
    sequence: int  # 0 .. num_return_sequences - 1
    text: str
    prompt_tokens: int
    completion_tokens: int  # tokens generated, the end-of-sequence token included
    finish_reason: str  # "stop" (a stop string), "eos" (end-of-sequence token) or "length" (max_new_tokens)
    time_to_first_token_s: float | None
    seconds: float  # the whole generate() call (shared by the sequences of a batch)
    completion_token_ids: list[int]  # the `completion_tokens` generated ids

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 2)}


class Engine(ABC):
    """A model with its tokenizer and chat template that completes prompts with hfllm's `Decoding` options."""

    context: int | None  # the context window in tokens (None: unknown)

    @abstractmethod
    def render(self, messages: list[dict[str, str]]) -> str:
        """The conversation through the chat template, ready for the assistant's answer."""

    @abstractmethod
    def count_tokens(self, text: str, chat: bool) -> int:
        """The number of tokens the model reads for `text` (a rendered chat holds its own special tokens)."""

    @abstractmethod
    def stream(self, prompt: str, rendered: str, decoding: Decoding, chat: bool) -> Generator[str, None, Completion]:
        """Decode `rendered`, yielding the text as it comes (cut before a stop string); returns the `Completion`.
        Abandoning the generator stops decoding."""

    @abstractmethod
    def require_chat_template(self, spec: str) -> None:
        """One line when the model `spec` has no chat template."""

    def check(self, decoding: Decoding) -> None:
        """One line for a decoding option the model cannot take, before any prompt is decoded."""

    def prompt_text(self, prompt: str, chat: bool, system: str | None = None) -> str:
        """What the model reads: `prompt`, or a user turn (after `system`) in the chat template."""
        return self.render(chat_messages(prompt, system)) if chat else prompt

    def complete(self, prompts: list[str], decoding: Decoding, *, chat: bool = False,
                 system: str | None = None) -> list[Completion]:
        """Every prompt completed, one after another."""
        return [finish(self.stream(prompt, self.prompt_text(prompt, chat, system), decoding, chat))
                for prompt in prompts]

    def stream_to(self, prompt: str, decoding: Decoding, out: TextIO, *, chat: bool = False,
                  system: str | None = None) -> Completion:
        """Complete one prompt, writing the text to `out` as it comes; the same text as `complete` gives."""
        return finish(self.stream(prompt, self.prompt_text(prompt, chat, system), decoding, chat), out)


def finish(run: Generator[str, None, Completion], out: TextIO | None = None) -> Completion:
    """Run `run` to its end (writing its text to `out`, if given) -> its Completion."""
    while True:
        try:
            piece = next(run)
        except StopIteration as done:
            return done.value
        if out is not None:
            out.write(piece)
            out.flush()
