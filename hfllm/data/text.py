"""The text and the tokenizer of a recipe, the same on every process.

Under `accelerate launch` the main process goes first (`args.main_process_first` in `hfllm/training/pretrain.py`): it trains
the tokenizer, tokenizes and packs (file-backed data lands in datasets' cache) and saves the tokenizer to
`output_dir/tokenizer`. The other processes wait, then load that saved tokenizer, so every rank uses the identical
one, and their packing of file-backed data is a cache hit. A resumed run loads `output_dir/tokenizer` too.
"""

import itertools
from pathlib import Path

from datasets import Dataset, IterableDataset

from ..errors import HfllmError
from .loading import load_text_datasets
from .tokenizer import load_or_train_tokenizer

TOKENIZER_DIR = "tokenizer"


def load_text(data_args, seed: int):
    """The recipe's train/validation text (`IterableDataset`s with `streaming: true`)."""
    return load_text_datasets(
        dataset=data_args.dataset, dataset_config=data_args.dataset_config, train_files=data_args.train_files,
        validation_files=data_args.validation_files, text_column=data_args.text_column,
        validation_split_percentage=data_args.validation_split_percentage, seed=seed,
        streaming=data_args.streaming, streaming_validation_documents=data_args.streaming_validation_documents,
    )  # fmt: skip


def tokenizer_texts(train: Dataset | IterableDataset, limit: int | None) -> list[str]:
    """The text a tokenizer is trained on: the first `limit` train documents (all of them when None)."""
    if isinstance(train, IterableDataset):
        if limit is None:
            raise HfllmError(
                "a streamed dataset has no end to train a tokenizer on; set tokenizer_train_documents "
                "(e.g. 100000) or give a tokenizer folder"
            )
        return [row["text"] for row in itertools.islice(train, limit)]
    if limit is not None and limit < len(train):
        train = train.select(range(limit))
    return train["text"]


def resolve_tokenizer(data_args, train: Dataset | IterableDataset, output_dir: str, is_main: bool, resuming: bool):
    """The main process trains (`bpe`/`char`) or loads the tokenizer; the other processes, and a resumed run,
    load the one saved in `output_dir/tokenizer` by `save_tokenizer`."""
    trained = data_args.tokenizer in ("bpe", "char")
    saved = Path(output_dir) / TOKENIZER_DIR
    if trained and (not is_main or (resuming and saved.is_dir())):
        if not saved.is_dir():
            raise HfllmError(f"the main process saved no tokenizer in {saved}; see its error above")
        return load_or_train_tokenizer(str(saved), [], data_args.vocab_size)
    texts = tokenizer_texts(train, data_args.tokenizer_train_documents) if trained else []
    return load_or_train_tokenizer(data_args.tokenizer, texts, data_args.vocab_size)


def save_tokenizer(tokenizer, output_dir: str) -> None:
    tokenizer.save_pretrained(Path(output_dir) / TOKENIZER_DIR)


def take(dataset: Dataset | IterableDataset, count: int | None) -> Dataset | IterableDataset:
    """The first `count` rows (all when None)."""
    if count is None:
        return dataset
    if isinstance(dataset, IterableDataset):
        return dataset.take(count)
    return dataset.select(range(min(count, len(dataset))))
