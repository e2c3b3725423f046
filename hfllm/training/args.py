"""Recipes: one flat YAML file mapped onto three dataclasses with transformers' `HfArgumentParser`.

    model + architecture keys  -> ModelArguments (+ config overrides: any HfllmConfig field, e.g. `num_hidden_layers`)
    tokenizer, data, packing   -> DataArguments
    everything else            -> PretrainingArguments (transformers `TrainingArguments` plus a few pretraining keys)

Command-line flags (`--key value`) override the YAML; the YAML overrides `PRETRAINING_DEFAULTS`, which override
the dataclass defaults. YAML values are turned into command-line strings, so both sources go through the same
argparse type checks. An unknown key or a wrong type raises `HfllmError` before any work is done.
"""

import dataclasses
import difflib
import functools
import json
import math
import re
import sys
import typing
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import make_choice_type_function

from ..errors import HfllmError
from ..models import HfllmConfig

# HfllmConfig fields a recipe may set at top level; vocab_size comes from the tokenizer, special ids too
MODEL_CONFIG_KEYS = tuple(
    name for name in HfllmConfig.__annotations__
    if name not in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "use_cache")
)

# Defaults suited to pretraining, applied under the recipe (TrainingArguments' own defaults suit fine-tuning)
PRETRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/pretrain",
    "report_to": "tensorboard",
    "logging_steps": 10,
    "logging_first_step": True,
    "eval_strategy": "steps",
    "eval_steps": 200,
    "save_steps": 500,
    "save_total_limit": 2,
    "prediction_loss_only": True,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.1,
    "adam_beta2": 0.95,
    "max_grad_norm": 1.0,
}

# Recipe keys that may change between a run and its resumption (everything else must match to reuse output_dir)
SESSION_KEYS = {
    "resume_from_checkpoint", "overwrite_output_dir", "stop_at_step", "report_to", "logging_steps",
    "logging_first_step", "disable_tqdm", "dataloader_num_workers", "preprocessing_num_workers", "num_samples",
    "sample_max_new_tokens", "samples_at_eval", "eval_steps", "save_steps", "save_total_limit", "run_name",
    "torch_num_threads",
}


@dataclass
class ModelArguments:
    model: str = field(
        default="llama-tiny",
        metadata={"help": "a preset name (see `hfllm presets`), or a model folder to continue pretraining from. "
                          "HfllmConfig fields given as top-level keys (num_hidden_layers: 2, ...) override the preset."},
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "attention kernel: sdpa, eager, flash_attention_2, flex_attention"}
    )


@dataclass
class DataArguments:
    tokenizer: str = field(
        default="bpe", metadata={"help": "'bpe' or 'char' (trained on the train split), or a tokenizer folder"}
    )
    vocab_size: int = field(default=4096, metadata={"help": "vocabulary size of a trained tokenizer"})
    dataset: str | None = field(
        default=None, metadata={"help": "'shakespeare' (embedded; the default without train_files) or a Hub dataset"}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "configuration name of a Hub dataset"})
    train_files: list[str] | None = field(
        default=None, metadata={"help": "local .txt/.jsonl/.parquet/.csv files or globs (one document per .txt file)"}
    )
    validation_files: list[str] | None = field(
        default=None, metadata={"help": "validation files; default: validation_split_percentage of train_files"}
    )
    text_column: str = field(default="text", metadata={"help": "column holding the text in jsonl/parquet/csv"})
    validation_split_percentage: float = field(default=10.0, metadata={"help": "documents held out for validation"})
    block_size: int = field(default=256, metadata={"help": "tokens per training sequence"})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "evaluate on at most this many sequences (the first ones)"}
    )
    per_document_positions: bool = field(
        default=True,
        metadata={"help": "position ids restart at each document inside a packed block, so sdpa/eager/flex attend "
                          "within documents only (an explicit block-diagonal mask; false: plain causal attention)"},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "processes for tokenization"})
    streaming: bool = field(
        default=False,
        metadata={"help": "read the data as a stream (Hub or large local data): nothing is downloaded or tokenized "
                          "ahead of training; needs max_steps"},
    )
    streaming_validation_documents: int = field(
        default=1000,
        metadata={"help": "with streaming and no validation split: the first this many documents are validation"},
    )
    tokenizer_train_documents: int | None = field(
        default=None, metadata={"help": "train the tokenizer on at most this many train documents (the first ones)"}
    )


@dataclass
class PretrainingArguments(TrainingArguments):
    """`TrainingArguments` plus pretraining keys. `optim` also accepts "muon"; on a machine without a GPU,
    `bf16` runs on the CPU where it has bf16 instructions and falls back to float32 (with a warning) elsewhere."""

    global_batch_size: int | None = field(
        default=None, metadata={"help": "sequences per optimizer step over all devices; sets gradient_accumulation_steps"}
    )
    global_batch_tokens: int | None = field(
        default=None, metadata={"help": "tokens per optimizer step over all devices (rounded to whole sequences)"}
    )
    wsd_decay_ratio: float = field(
        default=0.2, metadata={"help": "share of max_steps in the final decay of lr_scheduler_type warmup_stable_decay"}
    )
    muon_lr: float | None = field(
        default=None, metadata={"help": "Muon's learning rate (default: learning_rate; Muon matches AdamW's update RMS)"}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "delete a previous hfllm run in output_dir instead of refusing to start"}
    )
    stop_at_step: int | None = field(
        default=None, metadata={"help": "end this session after this step with a checkpoint (the schedule still "
                                        "follows max_steps); resume later with resume_from_checkpoint: true"}
    )
    torch_num_threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads for torch (torch.set_num_threads; default one per core). 1 keeps small CPU "
                          "models fast on a machine whose cores are shared with other work"},
    )
    num_samples: int = field(default=3, metadata={"help": "texts generated at the end of training"})
    sample_prompts: list[str] | None = field(default=None, metadata={"help": "prompts for the samples (default: none)"})
    sample_max_new_tokens: int = field(default=200, metadata={"help": "length of each sample in tokens"})
    samples_at_eval: bool = field(default=False, metadata={"help": "also generate samples at each evaluation"})

    def __post_init__(self):
        self.use_muon = self.optim == "muon"
        if self.use_muon:
            self.optim = "adamw_torch"  # Trainer's name check; `PretrainTrainer.create_optimizer` builds Muon
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for (and torch warns about it)
        if (self.bf16 or self.fp16) and not torch.cuda.is_available():
            if self.bf16 and torch.cpu._is_avx512_bf16_supported():
                self.use_cpu = True  # bf16 autocast on a CPU with bf16 instructions
            else:
                print(f"warning: {'bf16' if self.bf16 else 'fp16'} needs a GPU or a CPU with bf16 instructions; "
                      "training in float32", file=sys.stderr)
                self.bf16 = self.fp16 = False
        super().__post_init__()


class RecipeParser(HfArgumentParser):
    """HfArgumentParser whose errors are `HfllmError`s naming the recipe key."""

    def __init__(self, prog: str):
        super().__init__((ModelArguments, DataArguments, PretrainingArguments), prog=prog, allow_abbrev=False)
        optim = next(action for action in self._actions if action.dest == "optim")
        optim.choices = [*optim.choices, "muon"]
        optim.type = make_choice_type_function(optim.choices)

    def error(self, message: str):
        # "argument --max_steps/--max-steps: invalid int value: 'ten'" -> "key 'max_steps': invalid int value: 'ten'"
        raise HfllmError(re.sub(r"^argument --([\w]+)(/--[\w-]+)*: ", r"key '\1': ", message))

    def valid_keys(self) -> list[str]:
        return [action.dest for action in self._actions if action.dest != "help"] + list(MODEL_CONFIG_KEYS)


@dataclass
class Recipe:
    """A parsed recipe: the three argument objects, the architecture overrides and the resolved key/values."""

    model: ModelArguments
    data: DataArguments
    training: PretrainingArguments
    model_overrides: dict[str, Any]
    resolved: dict[str, Any]  # every key set by the defaults, the YAML or the command line, typed


def _split_cli(argv: list[str]) -> dict[str, Any]:
    """`--key v1 [v2 ...]` / `--key=v` pairs -> {key: "v" or ["v1", "v2"]}; a bare `--flag` means true."""
    pairs: dict[str, Any] = {}
    key = None
    for token in argv:
        if token.startswith("--"):
            key, _, value = token[2:].partition("=")
            key = key.replace("-", "_")
            pairs[key] = [value] if value else []
        elif key is None:
            raise HfllmError(f"unexpected argument '{token}'; give flags as --key value after the recipe")
        else:
            pairs[key].append(token)
    # `--key null` unsets a key (back to its default), e.g. `--dataset null --train_files my.txt`
    return {
        key: None if values == ["null"] else values[0] if len(values) == 1 else (values or "true")
        for key, values in pairs.items()
    }


def _to_argv(values: dict[str, Any]) -> list[str]:
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _check_keys(keys, valid: list[str], source: str) -> None:
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise HfllmError(f"unknown key '{key}' in {source}{hint}")


def load_yaml(path: str) -> dict[str, Any]:
    recipe_path = Path(path)
    if not recipe_path.is_file():
        raise HfllmError(f"recipe '{path}' does not exist; give a YAML file such as recipes/tiny.yaml")
    try:
        values = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise HfllmError(f"recipe '{path}' is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise HfllmError(f"recipe '{path}' must be a mapping of key: value lines")
    return values


def parse_recipe(argv: list[str], prog: str) -> Recipe:
    """`RECIPE.yaml [--key value ...]` -> Recipe. Raises HfllmError on a missing recipe, unknown key or wrong type."""
    parser = RecipeParser(prog)
    if not argv or argv[0] in ("-h", "--help"):
        if argv:
            parser.print_help()
            raise SystemExit(0)
        raise HfllmError(f"give a recipe: {prog} RECIPE.yaml [--key value ...], for example recipes/tiny.yaml")
    if argv[0].startswith("--"):
        raise HfllmError(f"the recipe comes first: {prog} RECIPE.yaml [--key value ...]")
    recipe_values, cli_values = load_yaml(argv[0]), _split_cli(argv[1:])
    valid = parser.valid_keys()
    _check_keys(recipe_values, valid, argv[0])
    _check_keys(cli_values, valid, "the command line")

    # architecture overrides are parsed as YAML values (so `--layer_types [a, b]` and `--sliding_window 64` work)
    overrides = {k: v for k, v in recipe_values.items() if k in MODEL_CONFIG_KEYS}
    overrides.update({k: _yaml_value(v) for k, v in cli_values.items() if k in MODEL_CONFIG_KEYS})
    overrides = {k: _check_model_value(k, v) for k, v in overrides.items()}
    merged = {**PRETRAINING_DEFAULTS, **recipe_values, **cli_values}
    merged = {k: v for k, v in merged.items() if k not in MODEL_CONFIG_KEYS}

    namespace, rest = parser.parse_known_args(_to_argv(merged), namespace=Namespace())
    if rest:
        raise HfllmError(f"could not parse {' '.join(rest)}; give flags as --key value")
    objects = []
    for dtype in parser.dataclass_types:
        names = {f.name for f in dataclasses.fields(dtype) if f.init}
        try:
            objects.append(dtype(**{k: v for k, v in vars(namespace).items() if k in names}))
        except ValueError as error:
            raise HfllmError(f"invalid recipe: {str(error).strip().splitlines()[0]}") from None
    model_args, data_args, training_args = objects
    if data_args.dataset is None and data_args.train_files is None:
        data_args.dataset = "shakespeare"
    resolved = {k: getattr(namespace, k) for k in merged} | overrides
    for key in TrainingArguments._VALID_DICT_FIELDS:  # JSON strings back to mappings
        if isinstance(resolved.get(key), str) and resolved[key].startswith("{"):
            resolved[key] = json.loads(resolved[key])
    return Recipe(model_args, data_args, training_args, overrides, resolved)


@functools.lru_cache(maxsize=1)
def _parser_defaults() -> dict[str, Any]:
    parser = RecipeParser("recipe")
    return {action.dest: action.default for action in parser._actions if action.dest != "help"}


def recipe_default(key: str) -> Any:
    """The value a recipe key has when the recipe does not set it."""
    return PRETRAINING_DEFAULTS.get(key, _parser_defaults().get(key))


def _check_model_value(key: str, value: Any) -> Any:
    """Type-check an architecture override against HfllmConfig's annotation ("1e-3" from YAML becomes a float)."""
    allowed = []
    for hint in typing.get_args(HfllmConfig.__annotations__[key]) or (HfllmConfig.__annotations__[key],):
        allowed.append(dict if typing.is_typeddict(hint) else type(None) if hint is None else typing.get_origin(hint) or hint)
    if isinstance(value, str) and str not in allowed:
        for cast in (int, float):
            if cast in allowed:
                try:
                    return cast(value)
                except ValueError:
                    pass
    if (value is not None and not isinstance(value, tuple(allowed))) or (isinstance(value, bool) and bool not in allowed):
        expected = " or ".join(t.__name__ for t in allowed if t is not type(None))
        raise HfllmError(f"key '{key}': expected {expected}, got {value!r}")
    return value


def _yaml_value(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [_yaml_value(v) for v in value]
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def apply_global_batch(args: PretrainingArguments, block_size: int) -> None:
    """Set `gradient_accumulation_steps` so that one optimizer step sees the recipe's global batch on any number of
    devices: global = per_device_train_batch_size * world_size * accumulation."""
    if args.global_batch_size is not None and args.global_batch_tokens is not None:
        raise HfllmError("give global_batch_size (sequences) or global_batch_tokens, not both")
    sequences = args.global_batch_size
    if args.global_batch_tokens is not None:
        sequences = max(1, round(args.global_batch_tokens / block_size))
    if sequences is None:
        return
    per_step = args.per_device_train_batch_size * args.world_size
    if sequences % per_step:
        lower = max(per_step, sequences // per_step * per_step)
        raise HfllmError(
            f"global batch of {sequences} sequences is not a multiple of per_device_train_batch_size "
            f"({args.per_device_train_batch_size}) x {args.world_size} device(s); use {lower} or {lower + per_step}, "
            f"or change per_device_train_batch_size"
        )
    args.gradient_accumulation_steps = sequences // per_step


def scheduler_kwargs(args: PretrainingArguments) -> None:
    """Fill the decay length of the warmup-stable-decay schedule from `wsd_decay_ratio` unless given."""
    kwargs = dict(args.lr_scheduler_kwargs or {})
    if args.lr_scheduler_type == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
        kwargs["num_decay_steps"] = max(1, math.ceil(args.wsd_decay_ratio * args.max_steps))
    args.lr_scheduler_kwargs = kwargs
