"""Load text datasets as a `DatasetDict` with splits train/validation and one column "text" (one document per row).

Sources: the embedded "shakespeare" corpus, local files (globs allowed) or a Hugging Face Hub dataset name.
Local files by extension: .txt (split into documents on `<|endofdoc|>` lines; a file without them is one document),
.jsonl/.json, .parquet, .csv (the `text_column` is used). Several sources are mixed by weight with
`datasets.interleave_datasets`. Documents of the validation split that also occur in train are dropped from train.
"""

import contextlib
import glob
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import datasets
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
) -> DatasetDict | IterableDatasetDict:
    """Splits train/validation with one "text" column from `dataset` ("shakespeare" or a Hub name) or local files.

    Validation comes from `validation_files` or the Hub's "validation" split; otherwise
    `validation_split_percentage` % of the train documents are held out (by document, with `seed`).
    With `streaming=True` the splits are `IterableDataset`s (for large/Hub data); a stream without a validation
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
        if "train" not in hub:
            raise HfllmError(f"dataset '{dataset}' has no 'train' split; its splits are: {', '.join(hub)}")
        train = _select_text(hub["train"], text_column, dataset)
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


def mix_datasets(
    sources: list[DatasetDict | IterableDatasetDict],
    weights: list[float],
    seed: int = 0,
    stopping_strategy: str = "first_exhausted",
) -> DatasetDict | IterableDatasetDict:
    """Interleave the train splits with probabilities `weights` (normalised); "first_exhausted" stops when a source
    runs out, "all_exhausted" repeats sources until each was seen once. Validation splits are concatenated (each
    source evaluated in full). All sources must be of one kind (all streaming or none)."""
    if len(sources) != len(weights) or not sources:
        raise HfllmError(f"got {len(sources)} data source(s) and {len(weights)} weight(s); give one weight per source")
    if any(weight <= 0 for weight in weights):
        raise HfllmError(f"mixing weights must be positive, got {weights}")
    if len(sources) == 1:
        return sources[0]
    probabilities = [weight / sum(weights) for weight in weights]
    train = datasets.interleave_datasets(
        [s["train"] for s in sources], probabilities=probabilities, seed=seed, stopping_strategy=stopping_strategy
    )
    validation = datasets.concatenate_datasets([s["validation"] for s in sources])
    mixed = (IterableDatasetDict if isinstance(train, IterableDataset) else DatasetDict)(
        {"train": train, "validation": validation}
    )
    return drop_validation_duplicates(mixed)
