"""`hfllm generate MODEL`: complete prompts with transformers' `generate()`, in left-padded batches or streamed.

    hfllm generate runs/sft --prompt "Once upon a time" --max_new_tokens 64
    hfllm generate runs/sft --chat --prompt "What is 2+3?" --stream
    hfllm generate runs/sft --prompt_file prompts.txt --json > completions.jsonl
    echo "To be, or not" | hfllm generate runs/sft --do_sample --temperature 0.8 --seed 1

    hfllm generate runs/sft --load_in_4bit --prompt "..."                   bitsandbytes 4-bit weights (also --load_in_8bit)
    hfllm generate runs/sft --prompt_lookup 10 --prompt "Fix the typos: ..." speculative decoding (also --assistant DRAFT)

In Python: `complete(model, tokenizer, prompts, Decoding(...), chat=True)` -> a `Completion` per prompt and sequence.
"""

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import BatchEncoding, GenerationConfig, PreTrainedModel, set_seed

from ..errors import HfllmError
from .options import (Decoding, Parser, add_decoding_arguments, add_engine_arguments, add_model_arguments,
                      engine_threads, load_assistant, load_for_inference, quantization_from_args,
                      require_chat_template)
from .stream import DECODE_KWARGS, FirstTokenClock, StreamedGeneration, cut_at_stop


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


# ----------------------------------------------------------------------------- library


def render(tokenizer: Any, prompt: str, chat: bool, system: str | None = None) -> str:
    """The text the model reads: `prompt` as is, or as a user turn in the chat template (ready for the answer)."""
    if not chat:
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer: Any, texts: list[str], chat: bool) -> BatchEncoding:
    """Left-padded input_ids / attention_mask (B, T); a rendered chat already holds its special tokens."""
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)


def complete(model: PreTrainedModel, tokenizer: Any, prompts: list[str], decoding: Decoding, *, chat: bool = False,
             system: str | None = None, batch_size: int = 8,
             assistant_model: PreTrainedModel | None = None) -> list[Completion]:
    """Every prompt completed (in batches of `batch_size`; one at a time with speculative decoding, which transformers
    runs on batch size 1), `num_return_sequences` completions each, in order. `assistant_model`: the draft model of
    `decoding.assistant`."""
    config = decoding.generation_config(model, tokenizer)
    if decoding.speculative:
        batch_size = 1
    if decoding.seed is not None:
        set_seed(decoding.seed)
    completions: list[Completion] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start: start + batch_size]
        rendered = [render(tokenizer, prompt, chat, system) for prompt in batch]
        inputs = encode(tokenizer, rendered, chat).to(model.device)
        clock = FirstTokenClock()
        kwargs = {"tokenizer": tokenizer} if config.stop_strings else {}
        if assistant_model is not None:
            kwargs["assistant_model"] = assistant_model
        sequences = model.generate(**inputs, generation_config=config, streamer=clock, **kwargs)  # (B * n, T + new)
        seconds = time.perf_counter() - clock.start
        new_tokens = sequences[:, inputs["input_ids"].shape[1]:]  # (B * n, new)
        for row, generated in enumerate(new_tokens):
            index = row // decoding.num_return_sequences
            completions.append(_completion(
                tokenizer, config, generated, batch[index], rendered[index], int(inputs["attention_mask"][index].sum()),
                row % decoding.num_return_sequences, clock.first_token_s, seconds,
            ))
    return completions


def stream(model: PreTrainedModel, tokenizer: Any, prompt: str, decoding: Decoding, out: TextIO, *, chat: bool = False,
           system: str | None = None, assistant_model: PreTrainedModel | None = None) -> Completion:
    """Complete one prompt, writing the text to `out` as it comes; the same text as `complete` gives."""
    if decoding.num_return_sequences != 1:
        raise HfllmError("--stream prints one sequence; drop --num_return_sequences or --stream")
    config = decoding.generation_config(model, tokenizer)
    if decoding.seed is not None:
        set_seed(decoding.seed)
    rendered = render(tokenizer, prompt, chat, system)
    inputs = encode(tokenizer, [rendered], chat).to(model.device)
    run = StreamedGeneration(model, tokenizer, dict(inputs), config, decoding.stop, assistant_model=assistant_model)
    start = time.perf_counter()
    for piece in run:
        out.write(piece)
        out.flush()
    seconds = time.perf_counter() - start
    generated = run.sequences[0, inputs["input_ids"].shape[1]:]  # (new,)
    return _completion(tokenizer, config, generated, prompt, rendered, inputs["input_ids"].shape[1], 0,
                       run.first_token_s, seconds)


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


# ----------------------------------------------------------------------------- command line


def main(argv: list[str], prog: str) -> int:
    """`hfllm generate MODEL [--prompt TEXT ... | --prompt_file FILE] [options]` (stdin when no prompt is given)."""
    args = _parser(prog).parse_args(argv)
    decoding = Decoding.from_args(args)
    threads = engine_threads(args)
    if args.stream and args.json:
        raise HfllmError("--stream prints text as it comes and --json prints a record per prompt; choose one")
    if args.stream and decoding.num_return_sequences > 1:
        raise HfllmError("--stream prints one sequence; drop --num_return_sequences or --stream")
    if args.batch_size < 1:
        raise HfllmError(f"--batch_size must be at least 1 (got {args.batch_size})")
    prompts = read_prompts(args.prompt, args.prompt_file)
    if args.stream and len(prompts) > 1:
        raise HfllmError(f"--stream works on one prompt; got {len(prompts)} (drop --stream to complete them in batches)")
    if args.engine == "llama.cpp":
        completions = _complete_with_llama_cpp(args, decoding, prompts, threads)
        if completions is None:  # streamed
            return 0
    else:
        model, tokenizer = load_for_inference(args.model, args.dtype, quantization_from_args(args),
                                              float16_weights=decoding.float16_weights)
        assistant = load_assistant(decoding.assistant, model, tokenizer, args.dtype) if decoding.assistant else None
        if args.chat:
            require_chat_template(tokenizer, args.model)
        if args.stream:
            stream(model, tokenizer, prompts[0], decoding, sys.stdout, chat=args.chat, system=args.system,
                   assistant_model=assistant)
            print()
            return 0
        completions = complete(model, tokenizer, prompts, decoding, chat=args.chat, system=args.system,
                               batch_size=args.batch_size, assistant_model=assistant)
    for i, completion in enumerate(completions):
        if args.json:
            print(json.dumps(completion.as_json(), ensure_ascii=False))
        else:
            print(("\n" if i else "") + completion.text)
    return 0


def _complete_with_llama_cpp(args, decoding: Decoding, prompts: list[str], threads: int) -> list[Completion] | None:
    """`--engine llama.cpp`: the completions, or None when the one prompt was streamed to stdout."""
    from .llama_cpp_engine import open_engine

    engine = open_engine(args, threads)
    if args.chat:
        engine.require_chat_template(args.model)
    if args.stream:
        engine.stream(prompts[0], decoding, sys.stdout, chat=args.chat, system=args.system)
        print()
        return None
    return engine.complete(prompts, decoding, chat=args.chat, system=args.system)


def _parser(prog: str) -> Parser:
    parser = Parser(prog=prog, description="Complete prompts with a model (transformers generate()).")
    add_model_arguments(parser)
    source = parser.add_argument_group("prompts (standard input when neither is given)")
    source.add_argument("--prompt", action="append", default=None, metavar="TEXT", help="a prompt (repeatable)")
    source.add_argument("--prompt_file", default=None, metavar="FILE", help="one prompt per line, completed in batches")
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template (the prompt is a user turn)")
    parser.add_argument("--system", default=None, help="system message with --chat")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated (one prompt)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per completion: text, token counts, time to first token, tokens/s")
    parser.add_argument("--num_return_sequences", type=int, default=1, help="completions per prompt (with sampling)")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate() call (default 8)")
    add_decoding_arguments(parser, max_new_tokens=128)
    add_engine_arguments(parser)
    return parser


def read_prompts(prompts: list[str] | None, prompt_file: str | None) -> list[str]:
    """The prompts from --prompt, --prompt_file (one per non-empty line) or standard input (one prompt)."""
    if prompts is not None and prompt_file is not None:
        raise HfllmError("give --prompt or --prompt_file, not both")
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise HfllmError(f"prompt file '{prompt_file}' does not exist; give a text file with one prompt per line")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise HfllmError(f"prompt file '{prompt_file}' holds no prompt; write one prompt per line")
        return prompts
    if prompts is None:
        if sys.stdin.isatty():
            print("reading a prompt from standard input (end it with Ctrl-D)", file=sys.stderr)
        prompts = [sys.stdin.read().rstrip("\n")]
    if any(not prompt.strip() for prompt in prompts):
        raise HfllmError("empty prompt; give some text with --prompt, --prompt_file or on standard input")
    return prompts
