"""The datasets of the adaptation methods (SFT, DPO, ORPO, KTO, GRPO): the recipe's mixture or Hub dataset, loaded
and checked for the method's columns, empty rows and chat roles before any model is loaded."""

from pathlib import Path

from ..errors import HfllmError
from .chat_template import check_roles
from .loading import BUILDERS, reading

# the columns each method needs: one of these column sets must be present
REQUIRED_COLUMNS: dict[str, list[tuple[str, ...]]] = {
    "sft": [("messages",), ("prompt", "completion"), ("text",)],
    "dpo": [("prompt", "chosen", "rejected")],
    "orpo": [("prompt", "chosen", "rejected")],
    "kto": [("prompt", "completion", "label")],
    "grpo": [("prompt",)],
}


def load_splits(method: str, script_args, mixture_args, eval_wanted: bool):
    """(train, eval or None) from the recipe's mixture (`datasets:`) or `dataset_name`, checked for `method`."""
    from datasets import load_dataset
    from trl import get_dataset

    for entry in mixture_args.datasets:  # a local data file as `path:` -> the file builder with data_files
        suffix = Path(entry.path).suffix
        if suffix in BUILDERS and entry.data_files is None:
            entry.path, entry.data_files = BUILDERS[suffix], entry.path
        for data_file in [entry.data_files] if isinstance(entry.data_files, str) else []:
            if not Path(data_file).exists():
                raise HfllmError(f"no such data file: {data_file}; fix `data_files` in the recipe's datasets")
    try:
        with reading(_data_files(mixture_args.datasets)):  # a local file that does not parse: named with its line
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


def _data_files(entries) -> list[str]:
    """The local files named by the `data_files` of a recipe's `datasets:` (a path, a list, or split -> paths)."""
    files = []
    for entry in entries:
        given = entry.data_files
        for value in given.values() if isinstance(given, dict) else [given]:
            files += [value] if isinstance(value, str) else list(value or [])
    return files


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
