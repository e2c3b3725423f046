"""The datasets of the adaptation methods (SFT, DPO, ORPO, KTO, GRPO): the recipe's mixture (`datasets:`, sources
weighted by `fraction` or `tokens`, mixed with the recipe's seed by `hfllm.data.loading.mix_datasets`) or Hub
dataset, loaded and checked for the method's columns, empty rows and chat roles before any model is loaded."""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trl

from ..errors import HfllmError
from .chat_template import check_roles
from .loading import BUILDERS, DatasetConfig, check_weights, dataset_configs, mix_datasets, reading

# the columns each method needs: one of these column sets must be present
REQUIRED_COLUMNS: dict[str, list[tuple[str, ...]]] = {
    "sft": [("messages",), ("prompt", "completion"), ("text",)],
    "dpo": [("prompt", "chosen", "rejected")],
    "orpo": [("prompt", "chosen", "rejected")],
    "kto": [("prompt", "completion", "label")],
    "grpo": [("prompt",)],
}


@dataclass
class DatasetMixtureConfig(trl.DatasetMixtureConfig):
    """TRL's mixture keys (`datasets:`, `streaming`, `test_split_size`) with hfllm's `DatasetConfig` sources (a
    weight in `tokens` besides TRL's `fraction`)."""

    datasets: list[DatasetConfig] = field(
        default_factory=list, metadata={"help": "sources: path, name, data_dir, data_files, split, columns, fraction | tokens"}
    )

    def __post_init__(self):
        self.datasets = dataset_configs(self.datasets)


def row_token_counter(tokenizer) -> Callable[[dict[str, list]], list[int]]:
    """Tokens per row of a batch (a source's `tokens` weight): the text of its messages' contents, prompt and
    completion, or text, as `tokenizer` splits it (without a chat template's few tokens per turn)."""

    def text(value) -> str:
        return " ".join(m.get("content") or "" for m in value) if isinstance(value, list) else str(value or "")

    def count(batch: dict[str, list]) -> list[int]:
        columns = [c for c in ("messages", "prompt", "completion", "chosen", "text") if c in batch]
        texts = ["\n".join(text(batch[c][i]) for c in columns) for i in range(len(next(iter(batch.values()))))]
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return count


def load_mixture(method: str, script_args, mixture_args, eval_wanted: bool, seed: int = 0, tokenizer=None):
    """(train, eval or None, `Mixture` or None) from the recipe's `datasets:` mixed by weight with `seed` (the
    `tokenizer` counts `tokens` weights), or from `dataset_name`; checked for `method`. `test_split_size` holds out
    that share of the mixed rows for evaluation, with `seed`."""
    from datasets import load_dataset

    entries = mixture_args.datasets
    if entries:
        check_weights(entries)
    for entry in entries:  # a local data file as `path:` -> the file builder with data_files
        suffix = Path(entry.path).suffix
        if suffix in BUILDERS and entry.data_files is None:
            entry.path, entry.data_files = BUILDERS[suffix], entry.path
        for data_file in [entry.data_files] if isinstance(entry.data_files, str) else []:
            if not Path(data_file).exists():
                raise HfllmError(f"no such data file: {data_file}; fix `data_files` in the recipe's datasets")
    mixture = None
    try:
        with reading(_data_files(entries)):  # a local file that does not parse: named with its line
            if entries:
                sources = [_load_source(entry, mixture_args.streaming) for entry in entries]
                count = row_token_counter(tokenizer) if tokenizer is not None else None
                mixture = mix_datasets(sources, entries, seed, count)
                splits = {"train": mixture.train}
                if mixture_args.test_split_size is not None:
                    splits = mixture.train.train_test_split(test_size=mixture_args.test_split_size, seed=seed)
            elif script_args.dataset_name:
                splits = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
            else:
                raise HfllmError("the recipe names no data; add `datasets: [{path: data/sft.jsonl}]` or `dataset_name: ...`")
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        raise HfllmError(f"could not load the recipe's dataset ({' '.join(str(exc).split())[:200]}); check its path") from None

    train_name = "train" if entries else script_args.dataset_train_split
    test_name = "test" if entries else script_args.dataset_test_split
    if train_name not in splits:
        raise HfllmError(f"the dataset has no '{train_name}' split (it has {list(splits)}); set dataset_train_split")
    train = check_dataset(method, splits[train_name], "training")
    evaluation = None
    if eval_wanted:
        if test_name not in splits:
            raise HfllmError(f"evaluation is on but the dataset has no '{test_name}' split; set test_split_size or eval_strategy: 'no'")
        evaluation = check_dataset(method, splits[test_name], "evaluation")
    return train, evaluation, mixture


def _load_source(entry: DatasetConfig, streaming: bool):
    """One source of the mixture, its `columns` selected (a missing one named with those available)."""
    from datasets import load_dataset

    name = entry.data_files if isinstance(entry.data_files, str) else entry.path
    data = load_dataset(path=entry.path, name=entry.name, data_dir=entry.data_dir, data_files=entry.data_files,
                        split=entry.split, streaming=streaming)
    if entry.columns is not None:
        available = data.column_names or list(next(iter(data), {}))
        missing = [c for c in entry.columns if c not in available]
        if missing:
            raise HfllmError(f"dataset '{name}' has no column(s) {', '.join(missing)}; its columns are: "
                             f"{', '.join(available)}; fix `columns:` in the recipe's datasets")
        data = data.select_columns(entry.columns)
    return data


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
