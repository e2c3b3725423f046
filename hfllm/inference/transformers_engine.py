"""The engine of `--engine torch`: transformers' `generate()` on a loaded model, in left-padded batches or streamed.

    engine = TransformersEngine(model, tokenizer)          # model, tokenizer = load_for_inference(spec, "auto")
    [answer] = engine.complete(["What is 2+3?"], Decoding(max_new_tokens=32), chat=True)

    complete(model, tokenizer, prompts, Decoding(...), chat=True)   the same as a function: a Completion per prompt
    stream(model, tokenizer, prompt, Decoding(...), sys.stdout)      one prompt, its text written as it comes
"""

import copy
import time
from collections.abc import Generator
from typing import Any, TextIO

import torch
from transformers import GenerationConfig, PreTrainedModel, set_seed

from ..errors import HfllmError
from ..generation import DECODE_KWARGS, encode_prompts, generate_ids, render_chat
from .engine import Completion, Engine
from .options import Decoding, require_chat_template
from .stream import FirstTokenClock, StreamedGeneration, cut_at_stop


class TransformersEngine(Engine):
    """A transformers model and its tokenizer. `assistant_model`: the draft model of `decoding.assistant`;
    `batch_size`: prompts per generate() call in `complete` (one with speculative decoding, which transformers runs
    on batch size 1)."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any, assistant_model: PreTrainedModel | None = None,
                 batch_size: int = 8):
        self.model, self.tokenizer, self.assistant_model, self.batch_size = model, tokenizer, assistant_model, batch_size
        self.context = getattr(model.config, "max_position_embeddings", None)
        self._decoding: Decoding | None = None
        self._config: GenerationConfig | None = None

    def generation_config(self, decoding: Decoding) -> GenerationConfig:
        """`decoding` on top of the model's generation config, made once while the options stay the same (so a
        compiled decode step is reused from turn to turn)."""
        if self._decoding != decoding:
            self._config, self._decoding = decoding.generation_config(self.model, self.tokenizer), copy.deepcopy(decoding)
        return self._config

    def check(self, decoding: Decoding) -> None:
        self.generation_config(decoding)

    def render(self, messages: list[dict[str, str]]) -> str:
        return render_chat(self.tokenizer, messages)

    def count_tokens(self, text: str, chat: bool) -> int:
        return len(self.tokenizer(text, add_special_tokens=not chat)["input_ids"])

    def require_chat_template(self, spec: str) -> None:
        require_chat_template(self.tokenizer, spec)

    def stream(self, prompt: str, rendered: str, decoding: Decoding, chat: bool) -> Generator[str, None, Completion]:
        config = self.generation_config(decoding)
        inputs = encode_prompts(self.tokenizer, [rendered], chat).to(self.model.device)
        run = StreamedGeneration(self.model, self.tokenizer, dict(inputs), config, decoding.stop,
                                 assistant_model=self.assistant_model)
        start = time.perf_counter()
        yield from run
        seconds = time.perf_counter() - start
        prompt_tokens = inputs["input_ids"].shape[1]
        generated = run.sequences[0, prompt_tokens:]  # (new,)
        return _completion(self.tokenizer, config, generated, prompt, rendered, prompt_tokens, 0, run.first_token_s,
                           seconds)

    def stream_to(self, prompt: str, decoding: Decoding, out: TextIO, *, chat: bool = False,
                  system: str | None = None) -> Completion:
        if decoding.num_return_sequences != 1:
            raise HfllmError("--stream prints one sequence; drop --num_return_sequences or --stream")
        self.check(decoding)
        if decoding.seed is not None:
            set_seed(decoding.seed)
        return super().stream_to(prompt, decoding, out, chat=chat, system=system)

    def complete(self, prompts: list[str], decoding: Decoding, *, chat: bool = False,
                 system: str | None = None) -> list[Completion]:
        """Every prompt completed in batches, `num_return_sequences` completions each, in order."""
        config = self.generation_config(decoding)
        batch_size = 1 if decoding.speculative else self.batch_size
        if decoding.seed is not None:
            set_seed(decoding.seed)
        kwargs: dict[str, Any] = {"tokenizer": self.tokenizer} if config.stop_strings else {}
        if self.assistant_model is not None:
            kwargs["assistant_model"] = self.assistant_model
        completions: list[Completion] = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start: start + batch_size]
            rendered = [self.prompt_text(prompt, chat, system) for prompt in batch]
            clock = FirstTokenClock()
            inputs, new_tokens = generate_ids(self.model, self.tokenizer, rendered, chat=chat,
                                              generation_config=config, streamer=clock, **kwargs)  # (B * n, new)
            seconds = time.perf_counter() - clock.start
            for row, generated in enumerate(new_tokens):
                index = row // decoding.num_return_sequences
                completions.append(_completion(
                    self.tokenizer, config, generated, batch[index], rendered[index],
                    int(inputs["attention_mask"][index].sum()), row % decoding.num_return_sequences, clock.first_token_s,
                    seconds,
                ))
        return completions


def complete(model: PreTrainedModel, tokenizer: Any, prompts: list[str], decoding: Decoding, *, chat: bool = False,
             system: str | None = None, batch_size: int = 8,
             assistant_model: PreTrainedModel | None = None) -> list[Completion]:
    """`TransformersEngine.complete`: every prompt completed, `num_return_sequences` completions each, in order."""
    return TransformersEngine(model, tokenizer, assistant_model, batch_size).complete(prompts, decoding, chat=chat,
                                                                                      system=system)


def stream(model: PreTrainedModel, tokenizer: Any, prompt: str, decoding: Decoding, out: TextIO, *, chat: bool = False,
           system: str | None = None, assistant_model: PreTrainedModel | None = None) -> Completion:
    """`TransformersEngine.stream_to`: one prompt completed, its text written to `out` as it comes."""
    return TransformersEngine(model, tokenizer, assistant_model).stream_to(prompt, decoding, out, chat=chat,
                                                                           system=system)


def _completion(tokenizer: Any, config: GenerationConfig, generated: torch.Tensor, prompt: str, rendered: str,
                prompt_tokens: int, sequence: int, first_token_s: float | None, seconds: float) -> Completion:
    """A row of new tokens (padded after its end in a batch) -> its text and length. A row ends at its first EOS
    token, or at the fewest tokens that complete a stop string (what StopStringCriteria stopped on)."""
    ids = generated.tolist()
    eos = config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    eos_end = next((i + 1 for i, token in enumerate(ids) if token in eos), None)
    end = eos_end or len(ids)
    stop = config.stop_strings or []
    text = cut_at_stop(tokenizer.decode(ids[:end], **DECODE_KWARGS), stop)[0]
    stop_end = _stop_end(tokenizer, ids[:end], stop, rendered)
    if stop_end is not None:
        reason, end = "stop", stop_end
    else:
        reason = "eos" if eos_end else "length"
    return Completion(prompt, rendered, sequence, text, prompt_tokens, end, reason, first_token_s, seconds, ids[:end])


def _stop_end(tokenizer: Any, ids: list[int], stop: list[str], rendered: str) -> int | None:
    """The fewest of `ids` whose text completes a stop string, or None. Like transformers' StopStringCriteria, a
    stop string may begin in the prompt's last characters (then the text holds no stop string to cut)."""
    if not stop:
        return None
    tail = rendered[-(max(map(len, stop)) - 1):] if max(map(len, stop)) > 1 else ""

    def completes(count: int) -> bool:  # grows with count: bisect
        text = tail + tokenizer.decode(ids[:count], **DECODE_KWARGS)
        return any(text.find(s, max(0, len(tail) - len(s) + 1)) >= 0 for s in stop)

    if not ids or not completes(len(ids)):
        return None
    low, high = 1, len(ids)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if completes(middle) else (middle + 1, high)
    return high
