"""Checkpoints in and out: the one model loader, folders written atomically, the output-folder check, eval mode.

    model, tokenizer = load("runs/sft")          # hfllm or transformers folder, PEFT adapter folder, .gguf, Hub id
    with atomic_output("runs/merged") as tmp:    # written aside; appears under its name only when complete
        model.save_pretrained(tmp)
    with atomic_output("runs/sft", merge=True) as tmp:  # into a run's folder: config.json moved in last
        model.save_pretrained(tmp)
    resume = check_output_dir("runs/tiny", run=recipe, resume=None, overwrite=False)
    find_checkpoint("runs/tiny")                  # newest complete checkpoint-N; corrupt ones skipped with a warning
    with eval_mode(model):                        # and back to training mode afterwards if it was training
        model.generate(...)
"""

import contextlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .errors import HfllmError, first_line

HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
SPEC_HELP = "give an hfllm or transformers checkpoint folder, a PEFT adapter folder, a .gguf file or a Hub id"


# ----------------------------------------------------------------------------- loading


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


QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def quantization_config(
    *,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    bnb_4bit_quant_type: str | None = None,
    bnb_4bit_use_double_quant: bool = False,
    bnb_4bit_compute_dtype: str | None = None,
    dtype: str = "auto",
):
    """bitsandbytes 4/8-bit loading (transformers' `BitsAndBytesConfig`) from the flags of the same names, checked:
    one line on a bad combination. None when neither 4 nor 8 bits is asked for. The 4-bit compute dtype defaults
    to `dtype` (float32 for "auto")."""
    four_bit_flags = [name for name, given in (("bnb_4bit_quant_type", bnb_4bit_quant_type),
                                               ("bnb_4bit_use_double_quant", bnb_4bit_use_double_quant),
                                               ("bnb_4bit_compute_dtype", bnb_4bit_compute_dtype)) if given]
    if load_in_4bit and load_in_8bit:
        raise HfllmError("--load_in_4bit and --load_in_8bit exclude each other; choose one")
    if four_bit_flags and not load_in_4bit:
        raise HfllmError(f"--{four_bit_flags[0]} applies to 4-bit loading; add --load_in_4bit or drop it")
    if not (load_in_4bit or load_in_8bit):
        return None
    if bnb_4bit_quant_type is not None and bnb_4bit_quant_type not in QUANT_TYPES:
        raise HfllmError(f"--bnb_4bit_quant_type must be one of {', '.join(QUANT_TYPES)} (got {bnb_4bit_quant_type!r})")
    compute = bnb_4bit_compute_dtype or (dtype if dtype in COMPUTE_DTYPES else "float32")
    if compute not in COMPUTE_DTYPES:
        raise HfllmError(f"--bnb_4bit_compute_dtype must be one of {', '.join(COMPUTE_DTYPES)} (got {compute!r})")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise HfllmError("--load_in_4bit/--load_in_8bit need bitsandbytes, which is not installed; run "
                         "`pip install 'hfllm[qlora]'` or drop the flag")
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=bnb_4bit_quant_type or "nf4",
                              bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, compute))


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


# ----------------------------------------------------------------------------- writing


MODEL_MARKERS = ("config.json", "adapter_config.json")  # the files that make a folder loadable (`spec_kind`)


@contextlib.contextmanager
def atomic_output(
    target: str | Path, *, folder: bool = True, keep_existing: bool = False, merge: bool = False,
    staging: str | Path | None = None,
) -> Iterator[Path]:
    """Write `target` (a folder, or a file with `folder=False`) so that it appears only when complete.

    Yields a temporary sibling path (an empty folder, or a file path); when the block ends without error it is
    renamed to `target`, which may be absent or an empty folder. On error it is deleted and `target` is untouched.
    With `keep_existing`, a `target` another process completed meanwhile is kept and this copy dropped.
    With `merge`, `target` may be a non-empty folder (a training run's output_dir, with its checkpoints): the written
    files are moved into it one by one, each with `os.replace`, an earlier model's config.json / adapter_config.json
    removed first and the new ones moved last, so `load` never sees a half-replaced model. `staging` fixes the
    temporary folder's path (several processes writing one output must agree on it); it is emptied first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if staging is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    else:
        tmp = Path(staging)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    written = tmp if folder else tmp / target.name
    try:
        yield written
        if merge and target.is_dir() and any(target.iterdir()):
            _move_into(written, target)
            return
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        try:
            os.replace(written, target)
        except OSError:
            if not (keep_existing and target.exists()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into(source: Path, target: Path) -> None:
    """Move every entry of `source` into the folder `target` (replacing same-named ones), MODEL_MARKERS last."""
    for marker in MODEL_MARKERS:
        (target / marker).unlink(missing_ok=True)
    entries = sorted(source.iterdir(), key=lambda path: (path.name in MODEL_MARKERS, path.name))
    for entry in entries:
        destination = target / entry.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(entry, destination)


def check_output_dir(
    output_dir: str | Path,
    *,
    run: Any = None,
    resume: str | bool | None = None,
    overwrite: bool = False,
    session_keys: frozenset[str] = frozenset(),
) -> str | None:
    """Check an output folder before any work; returns the checkpoint to resume from, or None.

    A new or empty folder is always fine; a file is refused. Without `run` (convert, export, merge) any content is
    refused. With `run` (a `Recipe` of a training command): a folder holding another command's files is refused; a
    folder holding a run of a different recipe (keys outside `session_keys` differ) is refused unless `overwrite`;
    the same run is refused unless resuming (`resume`: true/"last" for the newest complete checkpoint-*, see
    `find_checkpoint`, or the path of a complete checkpoint).
    """
    from .recipe import RECIPE_FILE

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise HfllmError(f"output folder '{out}' is a file; give a folder path")
    existing = next(parent for parent in out.absolute().parents if parent.exists())  # the root always exists
    if not existing.is_dir():
        raise HfllmError(f"output folder '{out}' cannot be created: '{existing}' is a file; give a folder path")
    if not out.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise HfllmError(f"output folder '{out}' cannot be created: '{existing}' is not writable; choose another path")
    if resume not in (None, False, "false", "False"):
        if str(resume).lower() in ("true", "last"):
            checkpoint = find_checkpoint(out) if out.is_dir() else None
            if checkpoint is None:
                raise HfllmError(f"no complete checkpoint-* folder in {out} to resume from; train first or give a "
                                 "checkpoint path")
        else:
            checkpoint = str(resume)
            if not Path(checkpoint).is_dir():
                raise HfllmError(f"checkpoint '{checkpoint}' does not exist; give a checkpoint-* folder or 'true' for the last one")
            problem = checkpoint_problem(checkpoint)
            if problem is not None:
                raise HfllmError(f"checkpoint '{checkpoint}' is incomplete or corrupt ({problem}); give another "
                                 "checkpoint, or 'true' for the newest complete one")
        if run is not None and (out / RECIPE_FILE).is_file():
            _refuse_different_run(out, run, session_keys)
        return checkpoint
    if not out.exists() or not any(out.iterdir()):
        return None
    if run is None:
        raise HfllmError(f"output folder '{out}' is not empty; choose a new folder or remove it first")
    if not (out / RECIPE_FILE).is_file():
        raise HfllmError(f"output_dir {out} is not empty and holds no hfllm run; choose a new or empty folder")
    if overwrite:
        return None
    _refuse_different_run(out, run, session_keys)
    raise HfllmError(
        f"output_dir {out} already holds this run; continue it with --resume_from_checkpoint true, "
        "or start over with --overwrite_output_dir true"
    )


CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR + "-" + step


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from (a few words), or None when it is complete: its
    trainer_state.json parses and its weights pass `weights_problem`."""
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return "trainer_state.json does not parse"
    return weights_problem(folder)


def weights_problem(folder: str | Path) -> str | None:
    """Why a saved model or checkpoint folder is incomplete (a few words), or None: it holds model weights, every
    shard its index names is there, every safetensors header reads (a truncated file fails) and every torch-saved
    file (optimizer, scheduler, RNG state) has its zip directory, which torch writes last."""
    folder = Path(folder)
    files = [path for path in folder.iterdir() if path.is_file()]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, OSError):
            return f"{index.name} does not parse"
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            return f"shard {missing[0]} is missing"
    weights = [path for path in files if path.suffix == ".safetensors" or path.name in ("pytorch_model.bin", "adapter_model.bin")]
    if not weights and not any(path.is_dir() for path in folder.glob("global_step*")):  # DeepSpeed keeps its own
        return "no model weights"
    from safetensors import safe_open

    for path in sorted(files):
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
            except Exception as error:  # safetensors raises its own error type (and OSError for unreadable files)
                return f"{path.name} is unreadable: {first_line(error)}"
        elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
            return f"{path.name} is truncated or not a torch file"
    return None


def find_checkpoint(output_dir: str | Path, *, warn: bool = True) -> str | None:
    """The newest complete checkpoint-N folder in `output_dir` (see `checkpoint_problem`), or None. Incomplete or
    corrupt ones are skipped, each with a warning on stderr naming it."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = [(int(match.group(1)), path) for path in out.iterdir()
             if path.is_dir() and (match := CHECKPOINT_NAME.match(path.name))]
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        if warn:
            print(f"warning: skipping {path}: incomplete or corrupt ({problem}); trying an older checkpoint",
                  file=sys.stderr, flush=True)
    return None


def _refuse_different_run(out: Path, run, session_keys: frozenset[str]) -> None:
    import yaml

    from .recipe import RECIPE_FILE

    previous = yaml.safe_load((out / RECIPE_FILE).read_text(encoding="utf-8")) or {}
    for key in sorted(set(previous) | set(run.resolved)):
        if key in session_keys:
            continue
        before, now = previous.get(key, run.defaults.get(key)), run.value(key)
        if before != now:
            raise HfllmError(
                f"output_dir {out} holds a different run ({key} was {before!r}, now {now!r}); "
                "choose another output_dir, or set overwrite_output_dir: true to replace it"
            )


def clear_output_dir(output_dir: str | Path) -> None:
    """Delete an earlier hfllm run in output_dir (after `check_output_dir` allowed overwriting it)."""
    from .recipe import RECIPE_FILE

    out = Path(output_dir)
    if (out / RECIPE_FILE).is_file():
        shutil.rmtree(out)


# ----------------------------------------------------------------------------- modes


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode (no dropout, no router counting) inside the block; the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
