"""Recipes for TRL methods: one flat YAML parsed by TRL's parser, plus the dataset mixture it names.

A recipe's keys are split across TRL's dataclasses (`ScriptArguments`, the method's config such as `SFTConfig`,
`ModelConfig`, `DatasetMixtureConfig`) and `HfllmArguments` below. `hfllm sft RECIPE.yaml --key value` overrides the
YAML; unknown keys fail with one line. Defaults fit the machine: bf16 only on a GPU that supports it, gradient
checkpointing only on a GPU (on a CPU memory is not the limit and recomputation costs time).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from hfllm.chat import check_roles
from hfllm.errors import HfllmError


@dataclass
class HfllmArguments:
    """Recipe keys hfllm adds to TRL's."""

    chat_template: str | None = field(
        default=None, metadata={"help": "shipped template name (smollm2, chatml) or .jinja path; saved with the model"}
    )
    peft_type: str = field(default="lora", metadata={"help": "with use_peft: lora | prefix | prompt | p_tuning | ia3"})
    num_virtual_tokens: int = field(default=16, metadata={"help": "virtual tokens for prefix / prompt / p_tuning"})
    exact_match_file: str | None = field(
        default=None, metadata={"help": "test.jsonl from `hfllm data synth`: exact-match accuracy after training"}
    )
    exact_match_limit: int | None = field(default=None, metadata={"help": "score only the first N exact-match items"})


@dataclass
class GRPOArguments:
    """GRPO's reward functions, each `module:function` (TRL's reward signature)."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["hfllm.synth:exact_match_reward"], metadata={"help": "module:function rewards"}
    )


# the columns each method needs: one of these column sets must be present
REQUIRED_COLUMNS: dict[str, list[tuple[str, ...]]] = {
    "sft": [("messages",), ("prompt", "completion"), ("text",)],
    "dpo": [("prompt", "chosen", "rejected")],
    "orpo": [("prompt", "chosen", "rejected")],
    "kto": [("prompt", "completion", "label")],
    "grpo": [("prompt",)],
}


def machine_defaults() -> dict:
    gpu = torch.cuda.is_available()
    return {"bf16": gpu and torch.cuda.is_bf16_supported(), "gradient_checkpointing": gpu}


def parse_recipe(argv: list[str], config_class, prog: str, extra: tuple = ()) -> tuple:
    """`RECIPE.yaml [--key value ...]` -> (script_args, training_args, model_args, mixture_args, hfllm_args, *extra)."""
    parser = TrlParser((ScriptArguments, config_class, ModelConfig, DatasetMixtureConfig, HfllmArguments, *extra), prog=prog)
    parser.usage = f"{prog} RECIPE.yaml [--key value ...]"

    def error(message: str):
        raise HfllmError(f"{message}; see `{prog} --help`")

    parser.error = error  # argparse would print usage and exit; we want one line
    if argv[:1] in (["-h"], ["--help"]):
        parser.print_help()
        raise SystemExit(0)
    if not argv or argv[0].startswith("-"):
        raise HfllmError(f"give a recipe: {prog} RECIPE.yaml [--key value ...] (examples under recipes/)")
    recipe, overrides = Path(argv[0]), argv[1:]
    if not recipe.is_file():
        raise HfllmError(f"no such recipe: {recipe}")
    try:
        config = yaml.safe_load(recipe.read_text())
    except yaml.YAMLError as exc:
        raise HfllmError(f"{recipe} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise HfllmError(f"{recipe} must be a YAML mapping of recipe keys")
    known = {action.dest for action in parser._actions} | {"env"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise HfllmError(f"unknown key(s) in {recipe}: {', '.join(unknown)}; check the spelling against `{prog} --help`")

    parser.set_defaults(**machine_defaults())  # the YAML and then the CLI flags override these
    try:
        return tuple(parser.parse_args_and_config(["--config", str(recipe), *overrides]))
    except ValueError as exc:  # unknown CLI flags, and the dataclasses' own checks (e.g. bf16 on a CPU)
        raise HfllmError(f"{recipe}: {' '.join(str(exc).split())}") from None


# ----------------------------------------------------------------------------- datasets

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_splits(method: str, script_args, mixture_args, eval_wanted: bool):
    """(train, eval or None) from the recipe's mixture (`datasets:`) or `dataset_name`, checked for `method`."""
    from datasets import load_dataset
    from trl import get_dataset

    for entry in mixture_args.datasets:  # a local data file as `path:` -> the file builder with data_files
        suffix = Path(entry.path).suffix
        if suffix in DATA_FILE_BUILDERS and entry.data_files is None:
            entry.path, entry.data_files = DATA_FILE_BUILDERS[suffix], entry.path
        for data_file in [entry.data_files] if isinstance(entry.data_files, str) else []:
            if not Path(data_file).exists():
                raise HfllmError(f"no such data file: {data_file}; fix `data_files` in the recipe's datasets")
    try:
        if mixture_args.datasets:
            splits = get_dataset(mixture_args)
        elif script_args.dataset_name:
            splits = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
        else:
            raise HfllmError("the recipe names no data; add `datasets: [{path: data/sft.jsonl}]` or `dataset_name: ...`")
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        raise HfllmError(f"could not load the recipe's dataset ({' '.join(str(exc).split())[:200]}); check its path") from None

    train_name = "train" if mixture_args.datasets else script_args.dataset_train_split
    test_name = "test" if mixture_args.datasets else script_args.dataset_test_split
    if train_name not in splits:
        raise HfllmError(f"the dataset has no '{train_name}' split (it has {list(splits)}); set dataset_train_split")
    train = check_dataset(method, splits[train_name], "training")
    evaluation = None
    if eval_wanted:
        if test_name not in splits:
            raise HfllmError(f"evaluation is on but the dataset has no '{test_name}' split; set test_split_size or eval_strategy: 'no'")
        evaluation = check_dataset(method, splits[test_name], "evaluation")
    return train, evaluation


def check_dataset(method: str, dataset, name: str):
    """Keep the rows whose required columns are non-empty; check columns, emptiness and chat roles."""
    options = REQUIRED_COLUMNS[method]
    columns = next((option for option in options if set(option) <= set(dataset.column_names)), None)
    if columns is None:
        needs = " | ".join("+".join(option) for option in options)
        raise HfllmError(
            f"the {name} dataset has columns {dataset.column_names} but {method} needs {needs}; "
            "convert the data or select other columns (`columns:` in the recipe's datasets)"
        )
    before = len(dataset)
    dataset = dataset.filter(lambda row: all(row[c] not in (None, "", []) for c in columns if c != "label"))
    if len(dataset) == 0:
        raise HfllmError(
            f"the {name} dataset is empty after filtering ({before} rows, none with non-empty {'+'.join(columns)}); "
            "check data_files, split and fraction in the recipe"
        )
    conversational = [c for c in columns if isinstance(dataset[0][c], list)]
    for i, row in enumerate(dataset.select_columns(conversational)) if conversational else []:
        if method == "grpo":
            check_roles(row["prompt"] + [{"role": "assistant"}], f"{name} row {i}")
        elif "messages" in row:
            check_roles(row["messages"], f"{name} row {i}")
        else:  # prompt + each completion must alternate as one conversation
            prompt = row.get("prompt", [])
            for c in ("chosen", "rejected", "completion"):
                if c in row:
                    check_roles(prompt + row[c], f"{name} row {i} ({c})")
    return dataset
