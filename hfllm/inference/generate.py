"""`hfllm generate MODEL`: complete prompts with transformers' `generate()`, in left-padded batches or streamed.

    hfllm generate runs/sft --prompt "Once upon a time" --max_new_tokens 64
    hfllm generate runs/sft --chat --prompt "What is 2+3?" --stream
    hfllm generate runs/sft --prompt_file prompts.txt --json > completions.jsonl
    echo "To be, or not" | hfllm generate runs/sft --do_sample --temperature 0.8 --seed 1

    hfllm generate runs/sft --load_in_4bit --prompt "..."                   bitsandbytes 4-bit weights (also --load_in_8bit)
    hfllm generate runs/sft --prompt_lookup 10 --prompt "Fix the typos: ..." speculative decoding (also --assistant DRAFT)

In Python: `hfllm.generate("runs/sft", "Once upon a time", max_new_tokens=64)` -> a `Completion` per prompt and
sequence (the command prints their text); the keywords are the flags above.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, set_seed

from ..errors import HfllmError
from .engine import Engine
from .options import (Decoding, Parser, add_decoding_arguments, add_engine_arguments, add_model_arguments,
                      engine_threads, load_assistant, load_for_inference, quantization_from_args,
                      require_chat_template)
from .transformers_engine import Completion, TransformersEngine, complete, stream

__all__ = ["Completion", "complete", "generate", "main", "read_prompts", "stream"]

PROG = "hfllm generate"  # the API's errors read as the command's


def generate(model: str | os.PathLike | tuple[PreTrainedModel, Any], prompts: str | list[str] | None = None,
             **options: Any) -> list[Completion]:
    """Complete each prompt with `model`, in left-padded batches (the same text `hfllm generate` prints).

    Args:
        model: an hfllm or transformers folder, a PEFT adapter folder, a .gguf file or a Hub id; or a loaded
            `(model, tokenizer)` pair (put in eval mode).
        prompts: one prompt or a list of them (or `prompt_file="prompts.txt"`, one prompt per line).
        **options: the command's flags as keywords: `max_new_tokens` (128), `do_sample`, `temperature`, `top_p`,
            `top_k`, `min_p`, `repetition_penalty`, `seed`, `stop` (a text or a list), `num_return_sequences`,
            `chat` and `system` (the chat template), `batch_size`, `dtype`, `load_in_4bit`, `engine` ("torch" or
            "llama.cpp"), `gguf_quant`, `threads`, `assistant` / `prompt_lookup` (speculative decoding),
            `stream` (print the text to stdout as it comes; one prompt) ... (`hfllm generate --help` lists them).

    Returns:
        A `Completion` per prompt and sequence, in order: `.text`, `.finish_reason`, token counts, timings.
        Bad input raises `HfllmError` with the line the command prints.

    Example:
        >>> [c.text for c in hfllm.generate("runs/sft", ["2+3=", "4+4="], max_new_tokens=8)]
    """
    spec, loaded = _model_argument(model)
    if prompts is not None:
        options = {**options, "prompt": [prompts] if isinstance(prompts, str) else list(prompts)}
    elif options.get("prompt_file") is None:
        raise HfllmError("give the prompts: generate(model, \"text\" or [...]), or prompt_file=FILE")
    return run(_parser(PROG).parse_options([spec], options), loaded)


def _model_argument(model) -> tuple[str, tuple[PreTrainedModel, Any] | None]:
    """MODEL as the command line names it, and the loaded (model, tokenizer) pair when one was given."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model), None
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], PreTrainedModel):
        return f"<{type(model[0]).__name__} in memory>", model
    if isinstance(model, PreTrainedModel):
        raise HfllmError("a loaded model needs its tokenizer: give (model, tokenizer), or the model's folder")
    raise HfllmError(f"model must be a folder, a .gguf file, a Hub id or a (model, tokenizer) pair; got "
                     f"{type(model).__name__}")


def run(args: argparse.Namespace, loaded: tuple[PreTrainedModel, Any] | None = None) -> list[Completion]:
    """The parsed flags of `hfllm generate` -> the completions (`--stream`: the text also written to stdout as it
    comes). `loaded`: an in-memory (model, tokenizer) in MODEL's place."""
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
    engine = open_engine(args, decoding, threads, chat=args.chat, loaded=loaded)
    if args.stream:
        completion = engine.stream_to(prompts[0], decoding, sys.stdout, chat=args.chat, system=args.system)
        print()
        return [completion]
    return engine.complete(prompts, decoding, chat=args.chat, system=args.system)


# ----------------------------------------------------------------------------- command line


def main(argv: list[str], prog: str) -> int:
    """`hfllm generate MODEL [--prompt TEXT ... | --prompt_file FILE] [options]` (stdin when no prompt is given)."""
    args = _parser(prog).parse_args(argv)
    completions = run(args)
    for i, completion in enumerate([] if args.stream else completions):
        if args.json:
            print(json.dumps(completion.as_json(), ensure_ascii=False))
        else:
            print(("\n" if i else "") + completion.text)
    return 0


def open_engine(args: argparse.Namespace, decoding: Decoding, threads: int, *, chat: bool,
                loaded: tuple[PreTrainedModel, Any] | None = None) -> Engine:
    """The engine of `--engine`: MODEL loaded for transformers' generate() (with the draft model of --assistant), or
    its GGUF file loaded by llama.cpp on `threads` threads; `chat`: one line when MODEL has no chat template. torch's
    generator is seeded with `--seed` once loaded (llama.cpp seeds each answer itself). Shared by `hfllm generate` and
    `hfllm chat`. `loaded`: a (model, tokenizer) pair in MODEL's place (the torch engine; the model is put in eval
    mode)."""
    if loaded is not None and (args.engine != "torch" or decoding.float16_weights or quantization_from_args(args)):
        raise HfllmError("a loaded (model, tokenizer) runs on the torch engine as it is; give its folder for "
                         "--engine llama.cpp, --float16_weights or quantized loading")
    if args.engine == "llama.cpp":
        from .llama_cpp_engine import open_llama_cpp

        engine = open_llama_cpp(args, threads)
        if chat:
            engine.require_chat_template(args.model)
        return engine
    if loaded is not None:
        model, tokenizer = loaded
        model.eval()  # no dropout while decoding (batches are padded on the left by hfllm.generation)
    else:
        model, tokenizer = load_for_inference(args.model, args.dtype, quantization_from_args(args),
                                              float16_weights=decoding.float16_weights)
    if chat:
        require_chat_template(tokenizer, args.model)
    assistant = load_assistant(decoding.assistant, model, tokenizer, args.dtype) if decoding.assistant else None
    if decoding.seed is not None:
        set_seed(decoding.seed)
    return TransformersEngine(model, tokenizer, assistant, getattr(args, "batch_size", 8))


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
