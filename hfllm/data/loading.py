"""Load text datasets as a `DatasetDict` with splits train/validation and one column "text" (one document per row).

Sources: the embedded "shakespeare" corpus, local files (globs allowed) or a Hugging Face Hub dataset name.
Local files by extension: .txt (split into documents on `<|endofdoc|>` lines; a file without them is one document),
.jsonl/.json, .parquet, .csv (the `text_column` is used). Several sources are mixed by weight (`mix_datasets`, a
recipe's `datasets:`). Documents of the validation split that also occur in train are dropped from train.
"""

import contextlib
import dataclasses
import glob
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from datasets.exceptions import DatasetGenerationError

from ..errors import HfllmError, first_line
from .corpus import DOCUMENT_SEPARATOR, shakespeare_corpus, split_documents

logger = logging.getLogger(__name__)

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def resolve_files(patterns: str | list[str]) -> list[str]:
    """Expand paths and globs; every pattern must match at least one existing, non-empty file of a known type."""
    files = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise HfllmError(f"no file matches the pattern '{pattern}'; check the path and the glob")
        for path in matches:
            if not Path(path).is_file():
                raise HfllmError(f"data file '{path}' does not exist; check the path")
            if Path(path).suffix not in BUILDERS:
                raise HfllmError(
                    f"data file '{path}' has an unknown extension '{Path(path).suffix}'; "
                    f"use one of {', '.join(BUILDERS)}"
                )
            if Path(path).stat().st_size == 0:
                raise HfllmError(f"data file '{path}' is empty; give it some text or leave it out")
            files.append(path)
    if len({BUILDERS[Path(path).suffix] for path in files}) > 1:
        raise HfllmError(f"data files {files} mix formats; give files of one format per split")
    return files


class _DropReadFailures(logging.Filter):
    """datasets' builders log "Failed to read/load FILE ..." just before they raise; hfllm's one line replaces it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.getMessage().startswith("Failed to"))


@contextlib.contextmanager
def reading(files: list[str]) -> Iterator[None]:
    """Load local data `files` with datasets inside the block: a file that does not parse raises one `HfllmError`
    naming it (and its line), with no log lines of datasets' about it."""
    loggers = [logging.getLogger(f"datasets.packaged_modules.{name}.{name}") for name in set(BUILDERS.values())]
    quiet = _DropReadFailures()
    for builder_logger in loggers:
        builder_logger.addFilter(quiet)
    try:
        yield
    except DatasetGenerationError as error:
        raise unreadable_data(files, error) from None
    finally:
        for builder_logger in loggers:
            builder_logger.removeFilter(quiet)


def unreadable_data(files: list[str], error: Exception) -> HfllmError:
    """The one-line error for data files the datasets builder could not read: the first file and line that is not
    UTF-8 text (or not JSON, in JSON lines); else the builder's own reason."""
    for path in map(Path, files):
        problem = _first_bad_line(path) if path.suffix in (".txt", ".jsonl", ".json", ".csv") else None
        if problem:
            return HfllmError(f"data file '{path}' {problem}")
    reason = first_line(error.__cause__ or error)
    return HfllmError(f"could not read data file(s) {', '.join(files)} ({reason}); check their format")


def _first_bad_line(path: Path) -> str | None:
    """What is wrong with a text data file, naming its first bad line, or None when every line reads."""
    json_lines = path.suffix == ".jsonl"
    if path.suffix == ".json":  # one JSON document, else JSON lines
        try:
            json.loads(path.read_bytes())
            return None
        except ValueError:
            json_lines = True
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                return f"is not UTF-8 text (line {number}); give a UTF-8 text file"
            if json_lines and text.strip():
                try:
                    json.loads(text)
                except ValueError as bad:
                    return f"line {number} is not valid JSON ({bad.msg}); give one JSON object per line"
    return None


def _split_txt_documents(batch: dict[str, list[str]]) -> dict[str, list[str]]:
    return {"text": [document for text in batch["text"] for document in split_documents(text)]}


def _select_text(data: Dataset | IterableDataset, text_column: str, source: str) -> Dataset | IterableDataset:
    """Keep only `text_column`, renamed to "text"; the error lists the available columns."""
    columns = data.column_names or list(next(iter(data), {}))  # a stream may not know its columns before reading
    if text_column not in columns:
        raise HfllmError(
            f"text_column '{text_column}' not found in {source}; available columns: {', '.join(columns) or 'none'}"
        )
    data = data.select_columns([text_column])
    return data.rename_column(text_column, "text") if text_column != "text" else data


def load_files(
    patterns: str | list[str], text_column: str = "text", streaming: bool = False
) -> Dataset | IterableDataset:
    """One split from local files (see module docstring for the formats)."""
    files = resolve_files(patterns)
    builder = BUILDERS[Path(files[0]).suffix]
    with reading(files):
        if builder == "text":  # whole files, then documents on separator lines
            data = datasets.load_dataset("text", data_files=files, sample_by="document", split="train", streaming=streaming)
            return data.map(_split_txt_documents, batched=True, remove_columns=["text"])
        data = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming)
    return _select_text(data, text_column, f"{', '.join(files)}")


def _hold_out(train: Dataset | IterableDataset, percentage: float, seed: int, source: str, stream_count: int):
    """Split `percentage` % of the documents off `train` as validation (a stream: its first `stream_count`)."""
    if isinstance(train, IterableDataset):  # unknown length
        return train.skip(stream_count), train.take(stream_count)
    count = round(len(train) * percentage / 100)
    if count < 1 or count >= len(train):
        raise HfllmError(
            f"{source} has {len(train)} document(s), too few to hold out {percentage}% for validation; give "
            f"validation files, or separate documents in .txt files with '{DOCUMENT_SEPARATOR}' lines"
        )
    parts = train.train_test_split(test_size=count, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _text_hash(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


def drop_validation_duplicates(data: DatasetDict | IterableDatasetDict) -> DatasetDict | IterableDatasetDict:
    """Drop from train every document that also occurs (exactly) in validation; logs the count."""
    seen = {_text_hash(row["text"]) for row in data["validation"]}
    train = data["train"].filter(lambda row: _text_hash(row["text"]) not in seen)
    if isinstance(train, Dataset):
        dropped = len(data["train"]) - len(train)
        if dropped:
            logger.warning("dropped %d train document(s) that also occur in validation", dropped)
    data["train"] = train
    return data


def _check_not_empty(data: DatasetDict | IterableDatasetDict, source: str) -> None:
    if isinstance(data["train"], IterableDataset):
        return  # checked when packing (an empty stream packs to nothing)
    if not any(text and text.strip() for text in data["train"]["text"]):
        raise HfllmError(f"{source} contains no text in the train split; give documents with text")


def load_text_datasets(
    dataset: str | None = None,
    train_files: str | list[str] | None = None,
    validation_files: str | list[str] | None = None,
    text_column: str = "text",
    validation_split_percentage: float = 10.0,
    dataset_config: str | None = None,
    streaming: bool = False,
    seed: int = 0,
    streaming_validation_documents: int = 1000,
    split: str = "train",
) -> DatasetDict | IterableDatasetDict:
    """Splits train/validation with one "text" column from `dataset` ("shakespeare" or a Hub name) or local files.

    Validation comes from `validation_files` or the Hub's "validation" split; otherwise
    `validation_split_percentage` % of the train documents are held out (by document, with `seed`).
    `split`: the Hub split that is trained on. With `streaming=True` the splits are `IterableDataset`s (for large/Hub data); a stream without a validation
    source gives its first `streaming_validation_documents` documents to validation.
    """
    if (dataset is None) == (train_files is None):
        raise HfllmError("give exactly one data source: a dataset name ('shakespeare' or a Hub id) or train_files")
    source = dataset or str(train_files)
    if dataset == "shakespeare":
        corpus = shakespeare_corpus()
        data = DatasetDict({split: Dataset.from_dict({"text": texts}) for split, texts in corpus.items()})
        if streaming:
            data = IterableDatasetDict({split: part.to_iterable_dataset() for split, part in data.items()})
    elif dataset is not None:  # a Hub dataset (needs the network; not used offline)
        try:
            hub = datasets.load_dataset(dataset, dataset_config, streaming=streaming)
        except (ConnectionError, FileNotFoundError) as error:  # offline, or no such dataset
            raise HfllmError(f"dataset '{dataset}' is neither 'shakespeare' nor reachable on the Hugging Face Hub "
                             f"({first_line(error)}); give train_files (local files) or dataset: shakespeare") from None
        if split not in hub:
            raise HfllmError(f"dataset '{dataset}' has no '{split}' split; its splits are: {', '.join(hub)}")
        train = _select_text(hub[split], text_column, dataset)
        if "validation" in hub:
            validation = _select_text(hub["validation"], text_column, dataset)
        else:
            train, validation = _hold_out(
                train, validation_split_percentage, seed, dataset, streaming_validation_documents
            )
        data = (IterableDatasetDict if streaming else DatasetDict)({"train": train, "validation": validation})
    else:
        train = load_files(train_files, text_column, streaming)
        if validation_files is not None:
            validation = load_files(validation_files, text_column, streaming)
        else:
            train, validation = _hold_out(
                train, validation_split_percentage, seed, source, streaming_validation_documents
            )
        data = (IterableDatasetDict if streaming else DatasetDict)({"train": train, "validation": validation})
    _check_not_empty(data, source)
    return drop_validation_duplicates(data)


# ----------------------------------------------------------------------------- mixtures of weighted sources
# A recipe's `datasets:` (pretraining and every fine-tuning method): TRL's `DatasetConfig` keys, whose `fraction` is
# the source's share of the mixture, plus `tokens`, a token count to take from it. Rows are drawn in a seeded order.


@dataclasses.dataclass
class DatasetConfig:
    """One source of a recipe's `datasets:` mixture: a local file or glob, the embedded corpus ("shakespeare",
    pretraining) or a Hub id, with its weight: `fraction` (its share of the mixture's rows) or `tokens` (how many
    tokens to take from it, whole rows, repeated when it has fewer). All sources give the same kind of weight, or
    none (every row of every source)."""

    path: str
    name: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | dict[str, str] | None = None
    split: str = "train"
    columns: list[str] | None = None
    fraction: float | None = None
    tokens: int | None = None


@dataclasses.dataclass
class Mixture:
    """A mixed train split and what it holds: per source its rows, tokens (when counted) and realized share."""

    train: Dataset
    sources: list[dict[str, Any]]  # {"source", "weight", "rows", "tokens", "share"}
    unit: str  # what the shares count: "rows" or "tokens"
    sha256: str  # of the mixed rows in training order (the seed, weights and data in one value)

    def summary(self) -> str:
        """One line: each source's realized share against its weight."""
        parts = [f"{s['source']} {s['share']:.1%} of {self.unit} (weight {s['weight']}, {s['rows']} rows"
                 + (f", {s['tokens']} tokens)" if s["tokens"] is not None else ")") for s in self.sources]
        return f"data mixture: {'; '.join(parts)}; sha256 {self.sha256[:16]}"

    def record(self) -> dict[str, Any]:
        """What run_info.json keeps: the hash and the realized sources."""
        return {"sha256": self.sha256, "unit": self.unit, "sources": self.sources}


def dataset_configs(entries: list) -> list[DatasetConfig]:
    """A recipe's `datasets:` entries (mappings from YAML) as `DatasetConfig`s; an unknown key or no path: one line."""
    known = [f.name for f in dataclasses.fields(DatasetConfig)]
    configs = []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict):
            unknown = sorted(set(entry) - set(known))
            if unknown or "path" not in entry:
                problem = f"unknown key(s) {', '.join(unknown)}" if unknown else "no path"
                raise HfllmError(f"`datasets:` entry {i + 1} has {problem}; its keys are: {', '.join(known)}")
            entry = DatasetConfig(**entry)
        configs.append(entry)
    return configs


def check_weights(configs: list[DatasetConfig]) -> str | None:
    """The kind of weight the sources give ("fraction", "tokens" or None), checked: one kind, positive values."""
    if not configs:
        raise HfllmError("`datasets:` is empty; give at least one source, e.g. [{path: data/sft.jsonl}]")
    for config in configs:
        if config.fraction is not None and config.tokens is not None:
            raise HfllmError(f"dataset '{config.path}' gives both fraction and tokens; give one weight per source")
        for key in ("fraction", "tokens"):
            value = getattr(config, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
                                      or (key == "tokens" and value != int(value))):
                raise HfllmError(f"dataset '{config.path}': {key} must be a positive "
                                 f"{'whole number' if key == 'tokens' else 'number'}, got {value!r}")
    kinds = {"fraction" if c.fraction is not None else "tokens" if c.tokens is not None else None for c in configs}
    if len(kinds) > 1:
        raise HfllmError(f"`datasets:` mixes weights ({', '.join(sorted(map(str, kinds)))}); give every source a "
                         "fraction, or every source tokens, or none (all rows)")
    return kinds.pop()


def _seeded_order(rows: int, seed: int) -> Iterator[int]:
    """Row indices in a seeded order, without end: each pass over the rows in a new order."""
    rng = np.random.default_rng(seed)
    while True:
        yield from rng.permutation(rows).tolist()


def mix_datasets(
    sources: list[Dataset],
    configs: list[DatasetConfig],
    seed: int = 0,
    count_tokens: Callable[[dict[str, list]], list[int]] | None = None,
) -> Mixture:
    """One train split from `sources` weighted by their `configs` (see `DatasetConfig`), shuffled with `seed`.

    fraction: shares normalised to one; the mixture is the largest that oversamples no source (TRL's rule), each
    source's rows drawn in a seeded order. tokens: each source's rows in a seeded order until `tokens` are reached
    (counted by `count_tokens`, a batch -> token count per row). No weights: every row. Streams are interleaved
    with the fractions as probabilities (shares are then only expected, not counted)."""
    kind = check_weights(configs)
    names = [config.path if not isinstance(config.data_files, str) else config.data_files for config in configs]
    columns = [sorted(source.column_names or []) for source in sources]
    if any(c != columns[0] for c in columns):
        raise HfllmError(f"the sources have different columns ({'; '.join(f'{n}: {c}' for n, c in zip(names, columns))}"
                         "); select the same ones with `columns:` in the recipe's datasets")
    if isinstance(sources[0], IterableDataset):
        if kind == "tokens":
            raise HfllmError("weights in tokens need the whole sources; with streaming give fractions")
        weights = [config.fraction or 1 for config in configs]
        train = datasets.interleave_datasets(sources, probabilities=[w / sum(weights) for w in weights], seed=seed)
        expected = [{"source": n, "weight": w, "rows": None, "tokens": None, "share": w / sum(weights)}
                    for n, w in zip(names, weights)]
        return Mixture(train, expected, "rows", _spec_hash(names, weights, seed))
    for name, source in zip(names, sources):
        if len(source) == 0:
            raise HfllmError(f"dataset '{name}' has no rows; check its path, split and data_files")
    lengths = None
    if kind == "tokens":
        if count_tokens is None:
            raise HfllmError("weights in tokens need a tokenizer to count with; give a tokenizer folder or fractions")
        lengths = [source.map(lambda batch: {"_tokens": count_tokens(batch)}, batched=True,
                              remove_columns=source.column_names)["_tokens"] for source in sources]
    if kind == "fraction":  # the largest mixture that takes no row twice
        shares = [c.fraction / sum(c.fraction for c in configs) for c in configs]
        size = min(len(s) / share for s, share in zip(sources, shares))
    picked = []
    for i, (source, config) in enumerate(zip(sources, configs)):
        if kind == "tokens":
            if not sum(lengths[i]):
                raise HfllmError(f"dataset '{names[i]}' has no tokens; check its columns")
            order, total = [], 0
            for index in _seeded_order(len(source), seed + i):
                if total >= config.tokens:
                    break
                order.append(index)
                total += lengths[i][index]
        elif kind == "fraction":
            order = list(itertools.islice(_seeded_order(len(source), seed + i), round(shares[i] * size)))
        else:
            order = list(range(len(source)))
        picked.append(order)
    if any(not order for order in picked):
        empty = names[next(i for i, order in enumerate(picked) if not order)]
        raise HfllmError(f"dataset '{empty}' gets no row at these weights; raise its weight or leave it out")
    train = datasets.concatenate_datasets([s.select(order) for s, order in zip(sources, picked)]).shuffle(seed=seed)
    train = train.flatten_indices()
    token_counts = [sum(lengths[i][j] for j in order) for i, order in enumerate(picked)] if lengths else None
    counts = token_counts or [len(order) for order in picked]
    realized = [
        {"source": name, "weight": config.fraction or config.tokens or "all", "rows": len(order),
         "tokens": token_counts[i] if token_counts else None, "share": round(counts[i] / sum(counts), 4)}
        for i, (name, config, order) in enumerate(zip(names, configs, picked))
    ]
    return Mixture(train, realized, "tokens" if token_counts else "rows", _rows_hash(train))


def _rows_hash(data: Dataset) -> str:
    digest = hashlib.sha256()
    for batch in data.iter(batch_size=1000):
        digest.update(json.dumps(batch, sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()


def _spec_hash(names: list[str], weights: list[float], seed: int) -> str:
    return hashlib.sha256(json.dumps([names, weights, seed]).encode("utf-8")).hexdigest()


def load_text_mixture(
    configs: list[DatasetConfig],
    validation_split_percentage: float = 10.0,
    seed: int = 0,
    streaming: bool = False,
    count_tokens: Callable[[dict[str, list]], list[int]] | None = None,
) -> tuple[DatasetDict | IterableDatasetDict, Mixture]:
    """Pretraining text from a recipe's `datasets:`: each source loaded as by `load_text_datasets` ("shakespeare",
    local files or globs, a Hub id; `columns:` names its one text column), the train splits mixed by weight, the
    validation splits concatenated (each source evaluated in full)."""
    configs = dataset_configs(configs)
    check_weights(configs)
    loaded = []
    for config in configs:
        if config.columns is not None and len(config.columns) != 1:
            raise HfllmError(f"dataset '{config.path}': columns {config.columns}; pretraining reads one text "
                             "column, give `columns: [text]`")
        text_column = config.columns[0] if config.columns else "text"
        local = config.data_files or (None if config.path == "shakespeare" or not _is_local(config.path) else config.path)
        loaded.append(load_text_datasets(
            dataset=None if local else config.path, dataset_config=config.name, train_files=local,
            text_column=text_column, split=config.split, validation_split_percentage=validation_split_percentage,
            seed=seed, streaming=streaming,
        ))  # fmt: skip
    mixture = mix_datasets([data["train"] for data in loaded], configs, seed, count_tokens)
    validation = datasets.concatenate_datasets([data["validation"] for data in loaded])
    kind = IterableDatasetDict if streaming else DatasetDict
    return drop_validation_duplicates(kind({"train": mixture.train, "validation": validation})), mixture


def _is_local(path: str) -> bool:
    """A path (or glob) on this machine rather than a Hub id."""
    return Path(path).suffix in BUILDERS or glob.has_magic(path) or Path(path).exists()
