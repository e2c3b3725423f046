"""`hfllm generate MODEL`: complete prompts with transformers' `generate()`, in left-padded batches or streamed.

    hfllm generate runs/sft --prompt "Once upon a time" --max_new_tokens 64
    hfllm generate runs/sft --chat --prompt "What is 2+3?" --stream
    hfllm generate runs/sft --prompt_file prompts.txt --json > completions.jsonl
    echo "To be, or not" | hfllm generate runs/sft --do_sample --temperature 0.8 --seed 1

    hfllm generate runs/sft --load_in_4bit --prompt "..."                   bitsandbytes 4-bit weights (also --load_in_8bit)
    hfllm generate runs/sft --prompt_lookup 10 --prompt "Fix the typos: ..." speculative decoding (also --assistant DRAFT)

In Python: `complete(model, tokenizer, prompts, Decoding(...), chat=True)` (transformers_engine.py) -> a `Completion`
per prompt and sequence.
"""

import argparse
import json
import sys
from pathlib import Path

from transformers import set_seed

from ..errors import HfllmError
from .engine import Engine
from .options import (Decoding, Parser, add_decoding_arguments, add_engine_arguments, add_model_arguments,
                      engine_threads, load_assistant, load_for_inference, quantization_from_args,
                      require_chat_template)
from .transformers_engine import Completion, TransformersEngine, complete, stream

__all__ = ["Completion", "complete", "main", "read_prompts", "stream"]


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
    engine = open_engine(args, decoding, threads, chat=args.chat)
    if args.stream:
        engine.stream_to(prompts[0], decoding, sys.stdout, chat=args.chat, system=args.system)
        print()
        return 0
    completions = engine.complete(prompts, decoding, chat=args.chat, system=args.system)
    for i, completion in enumerate(completions):
        if args.json:
            print(json.dumps(completion.as_json(), ensure_ascii=False))
        else:
            print(("\n" if i else "") + completion.text)
    return 0


def open_engine(args: argparse.Namespace, decoding: Decoding, threads: int, *, chat: bool) -> Engine:
    """The engine of `--engine`: MODEL loaded for transformers' generate() (with the draft model of --assistant), or
    its GGUF file loaded by llama.cpp on `threads` threads; `chat`: one line when MODEL has no chat template. torch's
    generator is seeded with `--seed` once loaded (llama.cpp seeds each answer itself). Shared by `hfllm generate` and
    `hfllm chat`."""
    if args.engine == "llama.cpp":
        from .llama_cpp_engine import open_llama_cpp

        engine = open_llama_cpp(args, threads)
        if chat:
            engine.require_chat_template(args.model)
        return engine
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
