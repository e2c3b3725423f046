"""`--engine llama.cpp` for `hfllm generate` and `hfllm chat`: the model as a GGUF file, decoded by llama.cpp
(llama-cpp-python from hfllm's cached wheel, `hfllm.assets.llama_cpp`) on the CPU.

    hfllm generate runs/sft --engine llama.cpp --chat --prompt "What is 2+3?" --stream
    hfllm generate model.Q8_0.gguf --engine llama.cpp --prompt_file prompts.txt --json
    hfllm chat runs/sft --engine llama.cpp --gguf_quant q8_0 --threads 2

A `.gguf` MODEL is run as it is; any other MODEL spec is exported once with `hfllm export --to gguf`'s code
(`--gguf_quant`, default f16) into `$HFLLM_CACHE/gguf/`, in a folder keyed by the sha256 of the model's files. Prompts
are tokenized by llama.cpp from the file's vocabulary, `--chat` renders the chat template stored in the file, and
decoding takes hfllm's `Decoding` options; the flags llama.cpp cannot honour are refused in one line. Prompts run one
after another (no batching); the results are `hfllm.inference.engine.Completion`s, as with the torch engine.
"""

import argparse
import codecs
import functools
import hashlib
import json
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from ..errors import HfllmError
from ..files import sha256
from .engine import Completion, Engine
from .options import Decoding
from .stream import StopFilter

# flags of the torch engine, with their defaults: given with --engine llama.cpp they are refused, with the reason
TORCH_ONLY_FLAGS: dict[str, tuple[Any, str]] = {
    "dtype": ("auto", "the GGUF file fixes the weights' format; pick it with --gguf_quant"),
    "load_in_4bit": (False, "bitsandbytes quantizes torch weights; pick a GGUF format with --gguf_quant"),
    "load_in_8bit": (False, "bitsandbytes quantizes torch weights; pick a GGUF format with --gguf_quant"),
    "bnb_4bit_quant_type": (None, "it applies to bitsandbytes' 4-bit loading"),
    "bnb_4bit_use_double_quant": (False, "it applies to bitsandbytes' 4-bit loading"),
    "bnb_4bit_compute_dtype": (None, "it applies to bitsandbytes' 4-bit loading"),
    "cache": ("dynamic", "llama.cpp keeps its own KV cache"),
    "compile": (False, "llama.cpp runs compiled kernels already"),
    "float16_weights": (False, "--gguf_quant f16 gives llama.cpp float16 weights"),
    "assistant": (None, "speculative decoding runs on the torch engine"),
    "prompt_lookup": (None, "speculative decoding runs on the torch engine"),
    "assistant_early_exit": (None, "speculative decoding runs on the torch engine"),
    "num_return_sequences": (1, "llama.cpp decodes one sequence per prompt"),
    "web": (False, "the llama.cpp engine runs in the terminal"),
}
TRANSFORMERS_SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0}  # generate()'s defaults


def check_llama_cpp_args(args: argparse.Namespace) -> None:
    """One line for a flag of the torch engine given with `--engine llama.cpp` (a GGUF MODEL given --gguf_quant is
    `gguf_file`'s line)."""
    for name, (default, reason) in TORCH_ONLY_FLAGS.items():
        if getattr(args, name, default) != default:
            raise HfllmError(f"--{name} is not available with --engine llama.cpp ({reason}); drop it, or use "
                             "--engine torch")


# ----------------------------------------------------------------------------- the GGUF file


def content_key(spec: str) -> str:
    """sha256 of what MODEL loads from: a folder's files (not its subfolders, e.g. checkpoints), an adapter's files
    with its base model's key, a Hub id with the commit of its cached snapshot."""
    from ..checkpoint import spec_kind

    kind, digest = spec_kind(spec), hashlib.sha256()
    if kind == "hub":
        from huggingface_hub import snapshot_download

        digest.update(f"{spec}@{Path(snapshot_download(spec, allow_patterns=['config.json'])).name}".encode())
        return digest.hexdigest()
    folder = Path(spec)
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(f"{path.name}\0{sha256(path)}\n".encode())
    if kind == "adapter":
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise HfllmError(f"adapter '{spec}' names no base model (base_model_name_or_path); merge it first with "
                             "`hfllm merge`")
        digest.update(f"base\0{content_key(base)}".encode())
    return digest.hexdigest()


def gguf_file(spec: str, quant: str | None) -> Path:
    """MODEL as a GGUF file: a `.gguf` MODEL itself, else its `--gguf_quant` export (default f16), written once into
    `$HFLLM_CACHE/gguf/<name>-<content key>-<quant>/` by `hfllm export --to gguf`'s code and reused after."""
    from ..assets import cache_dir
    from ..checkpoint import check_gguf, spec_kind
    from ..models.convert import load_as_native
    from ..models.gguf_export import export_gguf

    if spec_kind(spec) == "gguf":
        if quant is not None:
            raise HfllmError(f"'{spec}' is a GGUF file already, run as it is; drop --gguf_quant")
        check_gguf(spec)
        return Path(spec)
    quant = quant or "f16"
    name = Path(spec).resolve().name if Path(spec).exists() else spec.replace("/", "--")
    out = cache_dir() / "gguf" / f"{name}-{content_key(spec)[:16]}-{quant}"
    path = out / f"{name}.{quant.upper()}.gguf"
    if not path.is_file():
        import torch
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        model, tokenizer = load_as_native(spec, dtype=torch.float32)
        export_gguf(model, tokenizer, out, quant, name)
    return path


# ----------------------------------------------------------------------------- the engine


class LlamaCppEngine(Engine):
    """A GGUF file loaded by llama.cpp, with its own tokenizer and chat template; completes prompts with hfllm's
    decoding options, one after another."""

    def __init__(self, path: Path, threads: int):
        from ..assets import llama_cpp

        self.path = path
        self.llama = llama_cpp(build=False).Llama(model_path=str(path), n_ctx=0, n_threads=threads,
                                                  n_threads_batch=threads, verbose=False)
        self.context = self.llama.n_ctx()  # the file's context length
        self.chat_template: str | None = self.llama.metadata.get("tokenizer.chat_template")

    def require_chat_template(self, spec: str) -> None:
        if not self.chat_template:
            raise HfllmError(f"model '{spec}' has no chat template (its GGUF file holds no tokenizer.chat_template); "
                             "drop --chat, or use a chat model")

    @functools.cached_property
    def _chat_formatter(self):
        """The file's chat template, parsed once (a chat renders it at every turn)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        model = self.llama._model
        eos, bos = self.llama.token_eos(), self.llama.token_bos()
        return Jinja2ChatFormatter(self.chat_template, eos_token=model.token_get_text(eos) if eos >= 0 else "",
                                   bos_token=model.token_get_text(bos) if bos >= 0 else "")

    def render(self, messages: list[dict[str, str]]) -> str:
        """The conversation through the file's chat template, ready for the assistant's answer."""
        return self._chat_formatter(messages=messages).prompt

    def count_tokens(self, text: str, chat: bool) -> int:
        return len(self.tokenize(text, chat))

    def tokenize(self, text: str, chat: bool) -> list[int]:
        """Token ids of `text`, special tokens parsed; BOS added (where the file says so) unless a chat is rendered."""
        return self.llama.tokenize(text.encode("utf-8"), add_bos=not chat, special=True)

    def stream(self, prompt: str, rendered: str, decoding: Decoding, chat: bool) -> Generator[str, None, Completion]:
        """Decode `rendered`, yielding the text as it comes (held back where a stop string may begin, cut before
        one); returns the `Completion`. The end-of-generation token counts as generated; its text is not shown."""
        import llama_cpp

        ids = self.tokenize(rendered, chat)
        if len(ids) + decoding.max_new_tokens > self.context:
            raise HfllmError(f"the prompt ({len(ids)} tokens) plus --max_new_tokens {decoding.max_new_tokens} outgrows "
                             f"the model's context of {self.context} tokens; shorten it or lower --max_new_tokens")
        if decoding.seed is not None:
            self.llama.set_seed(decoding.seed)
        self.llama.reset()  # no reuse of the last prompt's KV cache: the same prompt gives the same tokens
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
        stop = StopFilter(decoding.stop)
        generated, pieces, reason, first_token_s = [], [], "length", None
        start = time.perf_counter()
        for token in self.llama.generate(ids, **sampling(decoding)):
            first_token_s = first_token_s or time.perf_counter() - start
            generated.append(token)
            if llama_cpp.llama_vocab_is_eog(self.llama._model.vocab, token):
                reason = "eos"
                break
            if piece := stop.feed(text.decode(self.llama.detokenize([token]))):
                pieces.append(piece)
                yield piece
            if stop.stopped:
                reason = "stop"
                break
            if len(generated) == decoding.max_new_tokens:
                break
        if rest := stop.feed(text.decode(b"", final=True)) + stop.flush():
            pieces.append(rest)
            yield rest
        seconds = time.perf_counter() - start
        return Completion(prompt, rendered, 0, "".join(pieces), len(ids), len(generated), reason, first_token_s,
                          seconds, generated)


def sampling(decoding: Decoding) -> dict[str, float]:
    """`Llama.generate`'s sampler arguments: greedy (temperature 0), or the sampling flags over transformers'
    defaults (llama-cpp-python's own are others); the repetition penalty in both."""
    penalty = {"repeat_penalty": decoding.repetition_penalty or 1.0}
    if not decoding.do_sample:
        return {"temp": 0.0, **penalty}
    given = {name: value for name in TRANSFORMERS_SAMPLING if (value := getattr(decoding, name)) is not None}
    values = {**TRANSFORMERS_SAMPLING, **given}
    return {"temp": values["temperature"], "top_k": values["top_k"], "top_p": values["top_p"],
            "min_p": values["min_p"], **penalty}


def open_llama_cpp(args: argparse.Namespace, threads: int) -> LlamaCppEngine:
    """The checked flags, then MODEL's GGUF file loaded by llama.cpp to decode on `threads` threads. A missing model
    or a broken GGUF file is one line before llama.cpp is looked for (`gguf_file` checks it, then the engine loads
    llama.cpp); a model to export is not exported when llama.cpp is not there."""
    from ..assets import llama_cpp
    from ..checkpoint import spec_kind

    check_llama_cpp_args(args)
    if spec_kind(args.model) != "gguf":  # one line for a missing model; then one before a long export
        llama_cpp(build=False)
    return LlamaCppEngine(gguf_file(args.model, args.gguf_quant), threads)
