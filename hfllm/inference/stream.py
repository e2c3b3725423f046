"""Text as it is generated: transformers' `TextIteratorStreamer` fed by `model.generate` in a thread, stop strings
cut out of the stream, and a clock for the time to the first token.

    run = StreamedGeneration(model, tokenizer, inputs, config, stop=["\\n\\n"])
    for piece in run:                 # text pieces; the same text as decoding the finished output, cut at a stop
        print(piece, end="", flush=True)
    run.sequences                     # (1, prompt + new tokens), what generate() returned
"""

import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from ..generation import DECODE_KWARGS


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    found = [index for index in (text.find(s) for s in stop) if index >= 0]
    return (text[: min(found)], True) if found else (text, False)


class StopFilter:
    """Passes streamed text through, holding back a tail that could start a stop string; nothing after a stop."""

    def __init__(self, stop: list[str]):
        self.stop, self.pending, self.stopped = stop, "", False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text, self.stopped = cut_at_stop(self.pending + piece, self.stop)
        if self.stopped:
            self.pending = ""
            return text
        held = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.pending = text[len(text) - held:] if held else ""
        return text[: len(text) - held]

    def flush(self) -> str:
        text, self.pending = ("" if self.stopped else self.pending), ""
        return text


class FirstTokenClock(BaseStreamer):
    """A streamer that only notes when generate() hands over its first new tokens (its second `put`)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.puts = 0
        self.first_token_s: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt
            self.first_token_s = time.perf_counter() - self.start

    def end(self) -> None:
        pass


class _TimedTextStreamer(TextIteratorStreamer):
    def __init__(self, tokenizer: Any, clock: FirstTokenClock, **kwargs: Any):
        super().__init__(tokenizer, **kwargs)
        self.clock = clock

    def put(self, value: torch.Tensor) -> None:
        self.clock.put(value)
        super().put(value)


class _Cancel(StoppingCriteria):
    """Stops generate() at its next step once `event` is set."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class StreamedGeneration:
    """Iterate to get text pieces as `model.generate` produces them (batch size 1); then `sequences` holds the
    returned token ids and `first_token_s` the time to the first token. An error in generate() is raised here.
    Abandoning the iteration (a closed generator: a stop button, Ctrl-C) stops generate() at its next step."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any, inputs: dict[str, torch.Tensor],
                 config: GenerationConfig, stop: list[str] | None = None, timeout_s: float | None = None,
                 assistant_model: PreTrainedModel | None = None):
        self.clock = FirstTokenClock()
        self.streamer = _TimedTextStreamer(tokenizer, self.clock, skip_prompt=True, timeout=timeout_s, **DECODE_KWARGS)
        self.filter = StopFilter(stop or [])
        self.sequences: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.cancel = _Cancel()
        kwargs = dict(inputs, generation_config=config, streamer=self.streamer,
                      stopping_criteria=StoppingCriteriaList([self.cancel]))
        if config.stop_strings:
            kwargs["tokenizer"] = tokenizer
        if assistant_model is not None:  # speculative decoding with a draft model
            kwargs["assistant_model"] = assistant_model
        self.thread = threading.Thread(target=self._run, args=(model, kwargs), daemon=True)

    @property
    def first_token_s(self) -> float | None:
        return self.clock.first_token_s

    def _run(self, model: PreTrainedModel, kwargs: dict) -> None:
        try:
            self.sequences = model.generate(**kwargs)  # (1, prompt + new tokens)
        except BaseException as error:  # re-raised in the reading thread
            self.error = error
            self.streamer.end()

    def __iter__(self) -> Iterator[str]:
        self.clock.start = time.perf_counter()
        self.thread.start()
        try:
            for piece in self.streamer:
                if text := self.filter.feed(piece):
                    yield text
        finally:  # done, or abandoned by the reader
            self.cancel.event.set()
        self.thread.join()
        if self.error is not None:
            raise self.error
        if text := self.filter.flush():
            yield text
