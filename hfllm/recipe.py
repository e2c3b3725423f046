"""Recipes: one YAML file plus `--key value` overrides, loaded onto the dataclasses of any command.

    recipe = load_recipe(["recipes/tiny.yaml", "--max_steps", "50"], (ModelArguments, DataArguments,
                         PretrainingArguments), prog="hfllm pretrain", defaults=PRETRAINING_DEFAULTS)
    model_args, data_args, training_args = recipe.args
    recipe.save(training_args.output_dir)                       # recipe.yaml: re-runnable as is

The rules are the same for every command (pretrain, sft/dpo/orpo/kto/grpo, eval):
  - precedence: dataclass defaults < the command's `defaults` < the YAML file < the command line;
  - a key no dataclass (nor `free_keys`) declares stops the run: "unknown key 'X' in SOURCE (did you mean 'Y'?)";
  - YAML and command-line values go through the same typed parsing (transformers' `HfArgumentParser`), so a wrong
    type reads the same from both: "key 'max_steps': invalid int value: 'ten'"; mappings and lists of mappings
    (`datasets:`, `lr_scheduler_kwargs:`) are taken as YAML;
  - `null` in the YAML or `--key null` sets a key back to its default;
  - values every command shares are checked against `VALUE_RULES` ("key 'learning_rate': got -0.001; allowed: a
    number >= 0"), so that no library fails on them after the run started;
  - hardware: a TrainingArguments is fitted to the machine before it is built by `fit_training_arguments`, which the
    training commands give (hfllm/training/hardware.py: bf16 and GPU-only defaults off without a GPU, gloo for the
    processes of `accelerate launch`).
Every mistake raises `HfllmError` before any work is done.
"""

import copy
import dataclasses
import difflib
import json
import os
import re
import typing
from argparse import Namespace
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .errors import HfllmError

RECIPE_FILE = "recipe.yaml"


@dataclass
class Recipe:
    """A loaded recipe: one object per dataclass, the free keys, and every key the recipe or command line set."""

    path: str | None  # the YAML file (None for a command given only flags)
    args: tuple
    free: dict[str, Any]  # values of `free_keys`, typed
    resolved: dict[str, Any]  # keys set by the command's defaults, the YAML or the command line, typed
    defaults: dict[str, Any]  # the value of every key when nothing sets it

    def value(self, key: str) -> Any:
        return self.resolved.get(key, self.defaults.get(key))

    def save(self, folder: str | Path, leave_out: tuple[str, ...] = ()) -> Path:
        """Write the resolved recipe to `folder/recipe.yaml`; `hfllm <command> folder/recipe.yaml` reruns it."""
        kept = {key: value for key, value in self.resolved.items() if key not in leave_out}
        path = Path(folder) / RECIPE_FILE
        path.write_text(yaml.safe_dump(kept, sort_keys=False, allow_unicode=True), encoding="utf-8")
        return path


class _Parser(HfArgumentParser):
    def error(self, message: str):
        # "argument --max_steps/--max-steps: invalid int value: 'ten'" -> "key 'max_steps': invalid int value: 'ten'"
        raise HfllmError(re.sub(r"^argument --([\w]+)(/--[\w-]+)*: ", r"key '\1': ", message))


ATTENTION_IMPLEMENTATIONS = ["eager", *sorted(ALL_ATTENTION_FUNCTIONS.valid_keys())]  # or a Hub kernel "org/name"
# key -> (check, what is allowed): values of any command's recipe that the libraries would refuse only mid-run
VALUE_RULES: dict[str, tuple[Any, str]] = {
    "learning_rate": (lambda v: v >= 0, "a number >= 0"),
    "muon_lr": (lambda v: v >= 0, "a number >= 0"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "max_grad_norm": (lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    "adam_beta1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "adam_epsilon": (lambda v: v >= 0, "a number >= 0"),
    "warmup_steps": (lambda v: v >= 0, "a number >= 0 (below 1: a share of the steps)"),
    "per_device_train_batch_size": (lambda v: v >= 1, "a whole number >= 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, "a whole number >= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "a whole number >= 1"),
    "dataloader_num_workers": (lambda v: v >= 0, "a whole number >= 0"),
    "seed": (lambda v: 0 <= v < 2**32, "a whole number in [0, 2**32)"),
    "block_size": (lambda v: v >= 1, "a whole number >= 1"),
    "lora_r": (lambda v: v >= 1, "a whole number >= 1"),
    "lora_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "attn_implementation": (lambda v: v in ATTENTION_IMPLEMENTATIONS or "/" in v,
                            f"one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, or a Hub kernel org/name"),
}


def check_values(values: dict[str, Any]) -> None:
    """Check the keys of `VALUE_RULES` among `values` (None: the library's default, always fine)."""
    for key, (allowed, description) in VALUE_RULES.items():
        value = values.get(key)
        if value is not None and not allowed(value):
            raise HfllmError(f"key '{key}': got {value!r}; allowed: {description}")


RecipeInput = str | os.PathLike | Mapping[str, Any]  # the Python API's recipe: a YAML file or its mapping


def recipe_argv(recipe: RecipeInput, overrides: Mapping[str, Any]) -> list:
    """The Python API's `(recipe, **overrides)` as the command line that does the same: `[recipe, "--key", "value",
    ...]`, values written as YAML reads them (lists and mappings as flow YAML, True as true, None as null). A mapping
    recipe stays a mapping in first place; `load_recipe` takes it in place of the YAML file."""
    argv: list = [dict(recipe) if isinstance(recipe, Mapping) else os.fspath(recipe)]
    for key, value in overrides.items():
        if isinstance(value, bool) or value is None:
            text = "null" if value is None else str(value).lower()
        elif isinstance(value, (list, tuple, Mapping)):
            text = json.dumps(value if isinstance(value, Mapping) else list(value))
        else:
            text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
        argv += [f"--{key}", text]
    return argv


SHIPPED_RECIPES = Path(__file__).resolve().parent / "recipes"  # the repository's recipes/, installed with the package


def find_recipe(path: str | os.PathLike) -> Path:
    """`path` itself when it exists; else, for `recipes/...` (the shipped recipes), the copy installed with hfllm, so
    that `hfllm.pretrain("recipes/tiny.yaml")` works from any folder (a notebook, an installed package)."""
    given = Path(path)
    if given.exists() or given.is_absolute() or given.parts[:1] != ("recipes",):
        return given
    shipped = SHIPPED_RECIPES.joinpath(*given.parts[1:])
    return shipped if shipped.is_file() else given


def read_yaml(path: str | Mapping[str, Any]) -> dict[str, Any]:
    """A recipe file as a mapping; a missing file, invalid YAML or a non-mapping is one line. A mapping (the Python
    API's recipe) is taken as the file's content."""
    if isinstance(path, Mapping):
        return copy.deepcopy(dict(path))
    recipe_path = find_recipe(path)
    if not recipe_path.is_file():
        raise HfllmError(f"recipe '{path}' does not exist; give a YAML file (examples under recipes/)")
    try:
        values = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise HfllmError(f"recipe '{path}' is not UTF-8 text; give a YAML file") from None
    except yaml.YAMLError as error:
        raise HfllmError(f"recipe '{path}' is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise HfllmError(f"recipe '{path}' must be a mapping of key: value lines")
    return values


def split_flags(argv: list[str]) -> dict[str, Any]:
    """`--key v1 [v2 ...]` / `--key=v` pairs -> {key: "v" or ["v1", "v2"]}; a bare `--flag` means true and
    `--key null` means the key's default."""
    pairs: dict[str, list[str]] = {}
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
    return {
        key: None if values == ["null"] else values[0] if len(values) == 1 else (values or "true")
        for key, values in pairs.items()
    }


def check_keys(keys, valid: list[str], source: str) -> None:
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3)
            close = [name for name in close if name[:4] == key[:4]] + close  # a shared prefix beats a better ratio
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise HfllmError(f"unknown key '{key}' in {source}{hint}")


def load_recipe(
    argv: list[str],
    dataclass_types: tuple[type, ...],
    prog: str,
    defaults: dict[str, Any] | None = None,
    free_keys: dict[str, Any] | None = None,
    values: dict[str, Any] | None = None,
    fit_training_arguments: Callable[[dict[str, Any], set[str]], None] | None = None,
) -> Recipe:
    """`RECIPE.yaml [--key value ...]` -> Recipe. With `values` (a command given without a recipe file, such as
    `hfllm eval MODEL --tasks ...`), argv holds only flags and `values` takes the YAML's place.

    `free_keys` maps extra keys (not dataclass fields, such as a model config's fields) to their type annotations.
    `fit_training_arguments(kwargs, explicit_keys)` adjusts a TrainingArguments' keyword arguments in place before it
    is built (the training commands pass `hfllm.training.hardware.apply_hardware`).
    """
    free_keys = free_keys or {}
    parser = _Parser(dataclass_types, prog=prog, allow_abbrev=False)
    if argv[:1] in (["-h"], ["--help"]):
        parser.print_help()
        raise SystemExit(0)
    if values is None:
        if not argv or (isinstance(argv[0], str) and argv[0].startswith("-")):
            raise HfllmError(f"give a recipe first: {prog} RECIPE.yaml [--key value ...] (examples under recipes/)")
        path, file_values, flags = argv[0], read_yaml(argv[0]), split_flags(argv[1:])
        source = "the recipe mapping" if isinstance(path, Mapping) else f"recipe '{path}'"
        path = None if isinstance(path, Mapping) else path
    else:
        path, file_values, flags, source = None, values, split_flags(argv), "the arguments"
    fields = [action.dest for action in parser._actions if action.dest != "help"]
    check_keys(file_values, fields + list(free_keys), source)
    check_keys(flags, fields + list(free_keys), "the command line")

    # free keys are typed from their annotation; command-line strings are read as YAML (`--layer_types [a, b]`)
    free = {key: value for key, value in file_values.items() if key in free_keys}
    free.update({key: _yaml_scalar(value) for key, value in flags.items() if key in free_keys})
    free = {key: check_type(key, value, free_keys[key]) for key, value in free.items()}

    merged = {**(defaults or {}), **file_values, **flags}
    merged = {key: value for key, value in merged.items() if key not in free_keys}
    # mappings, lists of mappings and lists for a key typed `str | list[str]` (report_to) bypass the command-line
    # parsing, which would read such a list as one value
    single = {action.dest for action in parser._actions if action.nargs is None}
    structured = {}
    for key in list(merged):
        value = merged[key]
        if key in flags and isinstance(value, str) and value.startswith(("[", "{")):
            value = _yaml_scalar(value)  # `--lr_scheduler_kwargs '{num_decay_steps: 10}'`
        tokens = key in flags and isinstance(merged[key], list)  # `--key a b`: words, not a YAML list
        if isinstance(value, dict) or (isinstance(value, list) and value and (
                isinstance(value[0], dict) or (key in single and not tokens))):
            structured[key] = value
            del merged[key]
        else:
            merged[key] = value
    parser.set_defaults(**structured)
    namespace, rest = parser.parse_known_args(_to_argv(merged), namespace=Namespace())
    if rest:
        raise HfllmError(f"could not parse {' '.join(rest)}; give flags as --key value")
    check_values(vars(namespace))
    explicit = set(file_values) | set(flags)
    resolved = {key: _plain(copy.deepcopy(getattr(namespace, key))) for key in {**(defaults or {}), **file_values, **flags}
                if key not in free_keys} | free  # copied before the dataclasses can change the values in place
    objects = []
    for dtype in parser.dataclass_types:
        names = {f.name for f in dataclasses.fields(dtype) if f.init}
        kwargs = {key: value for key, value in vars(namespace).items() if key in names}
        if issubclass(dtype, TrainingArguments) and fit_training_arguments is not None:
            fit_training_arguments(kwargs, explicit)
        try:
            objects.append(dtype(**kwargs))
        except (ValueError, TypeError) as error:
            raise HfllmError(f"{source}: {' '.join(str(error).split())[:300]}") from None
    all_defaults = {action.dest: action.default for action in parser._actions if action.dest != "help"}
    return Recipe(path, tuple(objects), free, resolved, all_defaults | (defaults or {}))


def check_type(key: str, value: Any, annotation: Any) -> Any:
    """Check a free key's value against its annotation; "1e-3" from the command line becomes a float."""
    allowed = []
    for hint in typing.get_args(annotation) or (annotation,):
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


def _to_argv(values: dict[str, Any]) -> list[str]:
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv.append(f"--{key}={value}")  # one token: a value such as "-1e-3" is not taken for a flag
    return argv


def _yaml_scalar(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [_yaml_scalar(v) for v in value]
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _plain(value: Any) -> Any:
    """Enum members (Trainer's option types) as their strings, so the saved recipe is plain YAML."""
    if hasattr(value, "value") and not isinstance(value, (int, float, str)):
        return value.value
    if isinstance(value, str) and value[:1] == "{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value
