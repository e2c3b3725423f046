"""Command-line options shared by `hfllm generate` and `hfllm chat`: an argparse parser whose errors are one line,
the decoding flags, their checks, and the transformers `GenerationConfig` they become.

    parser = Parser(prog="hfllm generate")
    add_model_arguments(parser); add_decoding_arguments(parser, max_new_tokens=128)
    args = parser.parse_args(argv)
    decoding = Decoding.from_args(args)          # checked: HfllmError on a bad value
    model, tokenizer = load_for_inference(args.model, args.dtype)
    config = decoding.generation_config(model, tokenizer)
"""

import argparse
import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import CompileConfig, GenerationConfig, PreTrainedModel

from ..errors import ArgumentParser as Parser, HfllmError  # Parser: argparse whose usage errors are one line

DTYPES = ("auto", "float32", "bfloat16", "float16")
SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="hfllm or transformers folder, PEFT adapter folder, .gguf file or Hub id")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights' dtype (auto: the checkpoint's; bfloat16 is faster on CPUs with bf16 instructions)")


def add_decoding_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """The decoding flags; a sampling flag not given stays None (the model's generation config decides)."""
    group = parser.add_argument_group("decoding")
    group.add_argument("--max_new_tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--do_sample", action="store_true", default=None,
                      help="sample (also implied by --temperature/--top_p/--top_k/--min_p)")
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding (the default)")
    group.add_argument("--temperature", type=float, default=None, help="> 0; sampling only")
    group.add_argument("--top_p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    group.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens (0: all)")
    group.add_argument("--min_p", type=float, default=None, help="drop tokens below min_p x the top probability")
    group.add_argument("--repetition_penalty", type=float, default=None, help="> 0; 1.0 is none")
    group.add_argument("--seed", type=int, default=None, help="random seed (for reproducible sampling)")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop at this text and cut the output there (repeatable)")
    group.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                       help="KV cache: dynamic (default) or static (preallocated; for torch.compile)")
    group.add_argument("--compile", action="store_true",
                       help="compile the decode step with torch.compile (implies --cache static; on CPUs too)")


@dataclass
class Decoding:
    """Checked decoding options; `generation_config` turns them into transformers' GenerationConfig."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    num_return_sequences: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    cache: str = "dynamic"
    compile: bool = False  # torch.compile the decode step (with a static cache), on any device

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Decoding":
        """From parsed flags; sampling is on with --do_sample or any sampling flag, off with --greedy."""
        sampling_given = [name for name in SAMPLING_FLAGS if getattr(args, name) is not None]
        if args.do_sample is False and sampling_given:
            raise HfllmError(f"--{sampling_given[0]} applies to sampling; drop it or drop --greedy")
        decoding = cls(
            max_new_tokens=args.max_new_tokens,
            do_sample=bool(args.do_sample or sampling_given),
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            num_return_sequences=getattr(args, "num_return_sequences", 1),
            seed=args.seed,
            stop=list(args.stop),
            cache=args.cache,
            compile=args.compile,
        )
        decoding.check()
        return decoding

    def check(self) -> None:
        """One line on the first bad value."""
        if self.max_new_tokens < 1:
            raise HfllmError(f"--max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if self.temperature is not None and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise HfllmError(f"--temperature must be > 0 when sampling (got {self.temperature}); use --greedy for "
                             "deterministic output")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise HfllmError(f"--top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k is not None and self.top_k < 0:
            raise HfllmError(f"--top_k must be >= 0 (got {self.top_k})")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise HfllmError(f"--min_p must be in [0, 1] (got {self.min_p})")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise HfllmError(f"--repetition_penalty must be > 0 (got {self.repetition_penalty})")
        if self.num_return_sequences < 1:
            raise HfllmError(f"--num_return_sequences must be at least 1 (got {self.num_return_sequences})")
        if self.num_return_sequences > 1 and not self.do_sample:
            raise HfllmError("--num_return_sequences > 1 needs sampling (--do_sample): greedy gives one answer")
        if any(not text for text in self.stop):
            raise HfllmError("--stop needs a non-empty text")

    def generation_config(self, model: PreTrainedModel, tokenizer: Any) -> GenerationConfig:
        """The model's generation config with these options on top; greedy clears the sampling fields."""
        config = copy.deepcopy(model.generation_config)
        updates: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_return_sequences": self.num_return_sequences,
            "stop_strings": self.stop or None,
            "cache_implementation": "static" if self.cache == "static" or self.compile else None,
        }
        if self.compile:  # generate() compiles a static-cache decode step by itself only on GPUs; this asks on any
            compile_config = CompileConfig()
            compile_config._compile_all_devices = True
            updates["compile_config"] = compile_config
        if self.do_sample:
            updates.update({name: getattr(self, name) for name in SAMPLING_FLAGS if getattr(self, name) is not None})
        else:  # no sampling field left over from the checkpoint's config (transformers warns about those)
            updates.update(temperature=None, top_p=None, top_k=None, min_p=None)
        if self.repetition_penalty is not None:
            updates["repetition_penalty"] = self.repetition_penalty
        if config.pad_token_id is None:
            updates["pad_token_id"] = tokenizer.pad_token_id
        config.update(**updates)
        return config


def load_for_inference(spec: str, dtype: str) -> tuple[PreTrainedModel, Any]:
    """`hfllm.checkpoint.load` for generation: eval mode, no progress bar, a left-padding tokenizer with a pad token."""
    from transformers.utils import logging as transformers_logging

    from ..checkpoint import load, spec_kind

    spec_kind(spec)  # one line when MODEL names nothing
    transformers_logging.disable_progress_bar()
    model, tokenizer = load(spec, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    return model, tokenizer


def require_chat_template(tokenizer: Any, spec: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise HfllmError(f"model '{spec}' has no chat template; drop --chat, or use a chat model (its tokenizer needs "
                         "a chat_template)")
