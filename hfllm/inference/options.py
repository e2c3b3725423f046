"""Command-line options shared by `hfllm generate` and `hfllm chat`: an argparse parser whose errors are one line,
the model flags (dtype, bitsandbytes 4/8-bit), the decoding flags (speculative decoding included), their checks, and
the transformers `GenerationConfig` they become.

    parser = Parser(prog="hfllm generate")
    add_model_arguments(parser); add_decoding_arguments(parser, max_new_tokens=128)
    args = parser.parse_args(argv)
    decoding = Decoding.from_args(args)          # checked: HfllmError on a bad value
    model, tokenizer = load_for_inference(args.model, args.dtype, quantization_from_args(args))
    assistant = load_assistant(decoding.assistant, model, tokenizer, args.dtype) if decoding.assistant else None
    config = decoding.generation_config(model, tokenizer)
    model.generate(**inputs, generation_config=config, assistant_model=assistant)
"""

import argparse
import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import CompileConfig, GenerationConfig, PreTrainedModel

from ..checkpoint import QUANT_TYPES, quantization_config
from ..errors import ArgumentParser as Parser, HfllmError  # Parser: argparse whose usage errors are one line
from ..models.gguf_export import QUANTS
from .float16_weights import use_float16_weights

DTYPES = ("auto", "float32", "bfloat16", "float16")
SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="hfllm or transformers folder, PEFT adapter folder, .gguf file or Hub id")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights' dtype (auto: the checkpoint's; bfloat16 is faster on CPUs with bf16 instructions)")
    group = parser.add_argument_group("quantized loading (bitsandbytes; on the GPU, or the CPU without one)")
    group.add_argument("--load_in_4bit", action="store_true", help="4-bit weights (Linear4bit)")
    group.add_argument("--load_in_8bit", action="store_true", help="8-bit weights (LLM.int8, Linear8bitLt)")
    group.add_argument("--bnb_4bit_quant_type", choices=QUANT_TYPES, default=None, help="4-bit data type (default nf4)")
    group.add_argument("--bnb_4bit_use_double_quant", action="store_true",
                       help="quantize the 4-bit scales too (about 0.4 bits per weight less)")
    group.add_argument("--bnb_4bit_compute_dtype", choices=DTYPES[1:], default=None,
                       help="dtype of the 4-bit matmuls (default: --dtype; float32 for auto)")


def quantization_from_args(args: argparse.Namespace):
    """The checked `BitsAndBytesConfig` of `add_model_arguments`' flags, or None (full precision)."""
    return quantization_config(
        load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit, bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=args.bnb_4bit_compute_dtype,
        dtype=args.dtype,
    )


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
    group.add_argument("--float16_weights", action="store_true",
                       help="CPU: Linear weights in float16, packed for fbgemm (half the bytes per token; activations "
                            "stay float32; greedy tokens can differ rarely from float32's)")
    speculative = parser.add_argument_group(
        "speculative decoding (one of; greedy gives the same tokens as without; one prompt at a time)")
    speculative.add_argument("--assistant", default=None, metavar="MODEL",
                             help="draft model with the same tokenizer (a smaller model of the family)")
    speculative.add_argument("--prompt_lookup", type=int, default=None, metavar="N",
                             help="draft N tokens by matching the last n-gram in the prompt (no draft model)")
    speculative.add_argument("--assistant_early_exit", type=int, default=None, metavar="K",
                             help="self-speculation: draft with the model's own first K layers")


ENGINES = ("torch", "llama.cpp")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """`--engine torch|llama.cpp`, the GGUF format a model is exported to for llama.cpp, and `--threads`."""
    group = parser.add_argument_group("engine")
    group.add_argument("--engine", choices=ENGINES, default="torch",
                       help="torch: transformers' generate() (default); llama.cpp: the model as a GGUF file run by "
                            "llama.cpp on the CPU (exported once and cached, see docs/inference.md)")
    group.add_argument("--gguf_quant", choices=list(QUANTS), default=None,
                       help="--engine llama.cpp: the GGUF weights' format a non-GGUF MODEL is exported to (default f16)")
    group.add_argument("--threads", type=int, default=None,
                       help="CPU threads for decoding (default: torch's thread count, e.g. from OMP_NUM_THREADS)")


def engine_threads(args: argparse.Namespace) -> int:
    """Checks the engine arguments (`--gguf_quant` only with `--engine llama.cpp`, `--threads` >= 1) and returns the
    thread count: `--threads`, which the torch engine is set to, or torch's own."""
    if args.threads is not None and args.threads < 1:
        raise HfllmError(f"--threads must be at least 1 (got {args.threads})")
    if args.gguf_quant is not None and args.engine != "llama.cpp":
        raise HfllmError("--gguf_quant picks the GGUF weights of --engine llama.cpp; add --engine llama.cpp or drop it")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


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
    assistant: str | None = None  # a draft model's spec; the caller loads it (`load_assistant`)
    prompt_lookup: int | None = None
    assistant_early_exit: int | None = None
    compile: bool = False  # torch.compile the decode step (with a static cache), on any device
    float16_weights: bool = False  # the loader packs the Linear weights as float16 (`load_for_inference`)

    @property
    def speculative(self) -> bool:
        return any(value is not None for value in (self.assistant, self.prompt_lookup, self.assistant_early_exit))

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
            assistant=getattr(args, "assistant", None),
            prompt_lookup=getattr(args, "prompt_lookup", None),
            assistant_early_exit=getattr(args, "assistant_early_exit", None),
            compile=args.compile,
            float16_weights=getattr(args, "float16_weights", False),
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
        methods = [f"--{name}" for name in ("assistant", "prompt_lookup", "assistant_early_exit")
                   if getattr(self, name) is not None]
        if len(methods) > 1:
            raise HfllmError(f"{methods[0]} and {methods[1]} are two ways of drafting tokens; choose one")
        for name in ("prompt_lookup", "assistant_early_exit"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise HfllmError(f"--{name} must be at least 1 (got {value})")
        if self.speculative and self.num_return_sequences > 1:
            raise HfllmError(f"{methods[0]} decodes one sequence at a time; drop --num_return_sequences or {methods[0]}")

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
        if self.assistant_early_exit is not None:
            layers = model.config.get_text_config().num_hidden_layers
            if self.assistant_early_exit >= layers:
                raise HfllmError(f"--assistant_early_exit {self.assistant_early_exit} must be below the model's "
                                 f"{layers} layers (the draft is its first K layers)")
        updates.update(prompt_lookup_num_tokens=self.prompt_lookup, assistant_early_exit=self.assistant_early_exit)
        config.update(**updates)
        return config


def load_for_inference(spec: str, dtype: str, quantization=None, *,
                       float16_weights: bool = False) -> tuple[PreTrainedModel, Any]:
    """`hfllm.checkpoint.load` for generation: eval mode, no progress bar, a left-padding tokenizer with a pad token.
    `quantization`: a `BitsAndBytesConfig` (`quantization_from_args`) or None; `float16_weights`: pack the Linear
    weights as float16 for CPU decoding (`hfllm.inference.float16_weights`)."""
    from transformers.utils import logging as transformers_logging

    from ..checkpoint import load, spec_kind

    spec_kind(spec)  # one line when MODEL names nothing
    transformers_logging.disable_progress_bar()
    model, tokenizer = load(spec, dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                            quantization_config=quantization)
    if float16_weights:
        use_float16_weights(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    return model, tokenizer


def load_assistant(spec: str, model: PreTrainedModel, tokenizer: Any, dtype: str) -> PreTrainedModel:
    """The draft model of `--assistant`, loaded like the main model; refused in one line when its vocabulary differs
    from the model's (the draft's token ids must mean the same tokens)."""
    assistant, assistant_tokenizer = load_for_inference(spec, dtype)
    ours, theirs = tokenizer.get_vocab(), assistant_tokenizer.get_vocab()
    if ours != theirs:
        differ = len(set(ours.items()) ^ set(theirs.items()))
        raise HfllmError(f"--assistant '{spec}' has a different vocabulary ({len(theirs)} tokens, {differ} entries "
                         f"differ from the model's {len(ours)}); give a draft model with the same tokenizer")
    rows, assistant_rows = (m.config.get_text_config().vocab_size for m in (model, assistant))
    if rows != assistant_rows:
        raise HfllmError(f"--assistant '{spec}' predicts {assistant_rows} tokens, the model {rows}; give a draft model "
                         "with the same tokenizer and vocabulary size")
    return assistant


def require_chat_template(tokenizer: Any, spec: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise HfllmError(f"model '{spec}' has no chat template; drop --chat, or use a chat model (its tokenizer needs "
                         "a chat_template)")
