"""The one model loader: any model spec (hfllm or transformers folder, PEFT adapter folder, .gguf file, Hub id) ->
(model in eval mode, tokenizer); what a spec names (`spec_kind`), a folder's config, a GGUF file's header; eval mode.
"""

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..errors import HfllmError, first_line

HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
SPEC_HELP = "give an hfllm or transformers checkpoint folder, a PEFT adapter folder, a .gguf file or a Hub id"


def load(
    spec: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    merge_adapter: bool = False,
    base: str | None = None,
    config=None,
    attn_implementation: str | None = None,
    quantization_config=None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
) -> tuple[PreTrainedModel, Any]:
    """MODEL -> (model in eval mode, tokenizer or None).

    MODEL is an hfllm or transformers checkpoint folder, a PEFT adapter folder (its base model loaded under it, or
    `base`; merged into the weights with `merge_adapter`), a `.gguf` file (dequantized) or a Hub id. `config`
    replaces the checkpoint's config (e.g. with overrides); `quantization_config` (bitsandbytes 4/8-bit) places the
    model on the GPU, or the CPU without one. The tokenizer comes from the same place, else from the adapter's base.
    """
    path = Path(spec)
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": revision, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if config is not None:
        kwargs["config"] = config
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    tokenizer_kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}

    kind = spec_kind(spec)
    if kind == "adapter":
        return _load_adapter(path, base, merge_adapter, kwargs, tokenizer_kwargs, with_tokenizer)
    source = str(spec)
    if kind == "gguf":
        check_gguf(path)
        if quantization_config is not None:
            raise HfllmError(f"'{spec}' is a GGUF file (its own quantization, loaded dequantized); bitsandbytes cannot "
                             "quantize it again: drop --load_in_4bit/--load_in_8bit, or `hfllm convert` it to a "
                             "folder first")
        source = path.parent
        kwargs["gguf_file"] = tokenizer_kwargs["gguf_file"] = path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = _load_tokenizer(source, tokenizer_kwargs) if with_tokenizer else None
    except (OSError, ValueError, SafetensorError) as error:
        raise HfllmError(f"could not load model '{spec}': {first_line(error)}; {SPEC_HELP}") from None
    if getattr(model, "hf_quantizer", None) is not None and "gguf_file" in kwargs:
        model.hf_quantizer = None  # GGUF weights arrive dequantized: a plain model that save_pretrained accepts
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval(), tokenizer


def spec_kind(spec: str | Path) -> str:
    """What a model spec names: "adapter", "gguf", "folder" or "hub"; one line when it names nothing loadable.
    Cheap (no file is read), so commands check every spec before loading any."""
    path = Path(spec)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return "adapter"
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "config.json").is_file():
        return "folder"
    if path.exists():
        raise HfllmError(f"'{spec}' is not a model checkpoint (no config.json or adapter_config.json); {SPEC_HELP}")
    if HUB_ID.match(str(spec)) and not str(spec).startswith("."):
        return "hub"
    raise HfllmError(f"model '{spec}' does not exist; {SPEC_HELP}")


def read_config(folder: str | Path) -> dict[str, Any]:
    """A checkpoint folder's config.json as a mapping; a folder without one, or one that does not parse, is one
    line."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise HfllmError(f"'{folder}' has no config.json; it is not a checkpoint folder ({SPEC_HELP})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise HfllmError(f"'{path}' is not valid JSON ({first_line(error)}); save the model again") from None
    if not isinstance(config, dict):
        raise HfllmError(f"'{path}' is not a JSON object; save the model again")
    return config


def check_gguf(path: str | Path):
    """Read a .gguf file's header and tensor table (not its weights) -> its `gguf.GGUFReader`; a file of another
    format, a truncated one or one whose header is garbage is one line. Every GGUF read in hfllm goes through here."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        missing = "no general.architecture" if "general.architecture" not in reader.fields else (
            "no tensors" if not reader.tensors else None)
    except Exception as error:  # gguf raises ValueError for a bad magic or a short file; garbage in the header gives
        # IndexError, KeyError, struct or numpy errors, MemoryError for absurd counts: all mean a corrupt file
        missing = "magic" if "magic" in str(error) else first_line(error)
    if missing is not None:
        problem = "is not a GGUF file" if missing == "magic" else f"is truncated or corrupt ({missing})"
        raise HfllmError(f"'{path}' {problem}; give a complete .gguf file (e.g. from llama.cpp)")
    return reader


def _load_adapter(path: Path, base: str | None, merge: bool, kwargs: dict, tokenizer_kwargs: dict, with_tokenizer: bool):
    from peft import PeftConfig, PeftModel

    base = base or PeftConfig.from_pretrained(str(path)).base_model_name_or_path
    if not base:
        raise HfllmError(f"adapter '{path}' names no base model; pass the base model folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:
        raise HfllmError(f"could not load the base model '{base}' of adapter '{path}': {first_line(error)}; pass "
                         "the base model folder") from None
    model = PeftModel.from_pretrained(model, str(path))
    if merge:
        model = model.merge_and_unload()
    tokenizer = None
    if with_tokenizer:
        source = path if (path / "tokenizer_config.json").is_file() else base
        tokenizer = _load_tokenizer(source, tokenizer_kwargs)
    return model.eval(), tokenizer


def _load_tokenizer(source, kwargs: dict):
    return AutoTokenizer.from_pretrained(source, **kwargs)


def load_tokenizer(spec: str | Path):
    """The tokenizer saved with a model folder, for training: the EOS token pads when it has no padding token."""
    try:
        tokenizer = _load_tokenizer(spec, {})
    except (OSError, ValueError) as error:
        raise HfllmError(f"could not load a tokenizer from '{spec}' ({first_line(error)}); save one with the model") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode (no dropout, no router counting) inside the block; the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
