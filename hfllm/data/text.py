"""The text and the tokenizer of a recipe, the same on every process.

Under `accelerate launch` the main process goes first (`args.main_process_first` in `hfllm/training/pretrain.py`): it trains
the tokenizer, tokenizes and packs (file-backed data lands in datasets' cache) and saves the tokenizer to
`output_dir/tokenizer`. The other processes wait, then load that saved tokenizer, so every rank uses the identical
one, and their packing of file-backed data is a cache hit. A resumed run loads `output_dir/tokenizer` too.
"""

import itertools
from pathlib import Path

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

from ..errors import HfllmError
from .loading import Mixture, dataset_configs, load_text_datasets, load_text_mixture
from .tokenizer import load_or_train_tokenizer

TOKENIZER_DIR = "tokenizer"


def load_text(data_args, seed: int):
    """The recipe's train/validation text (`IterableDataset`s with `streaming: true`)."""
    return load_text_and_mixture(data_args, seed)[0]


def load_text_and_mixture(data_args, seed: int) -> tuple[DatasetDict | IterableDatasetDict, Mixture | None]:
    """The recipe's text and, for a `datasets:` mixture, its `Mixture` record (realized shares, hash). `tokens`
    weights are counted with the recipe's tokenizer folder (a tokenizer trained on the mixture does not exist yet)."""
    if data_args.datasets:
        if data_args.dataset is not None or data_args.train_files is not None:
            raise HfllmError("give `datasets:` (a mixture) or dataset / train_files, not both")
        configs = dataset_configs(data_args.datasets)
        count_tokens = None
        if any(config.tokens is not None for config in configs):
            if data_args.tokenizer in ("bpe", "char"):
                raise HfllmError("`tokens` weights are counted with a tokenizer folder (`tokenizer: DIR`); a tokenizer "
                                 "trained on the mixture does not exist before it: give fractions instead")
            tokenizer = load_or_train_tokenizer(data_args.tokenizer, [], data_args.vocab_size)

            def count_tokens(batch: dict[str, list]) -> list[int]:
                return [len(ids) + 1 for ids in tokenizer(batch["text"])["input_ids"]]  # + the EOS packing adds

        return load_text_mixture(configs, data_args.validation_split_percentage, seed, data_args.streaming, count_tokens)
    return load_text_datasets(
        dataset=data_args.dataset, dataset_config=data_args.dataset_config, train_files=data_args.train_files,
        validation_files=data_args.validation_files, text_column=data_args.text_column,
        validation_split_percentage=data_args.validation_split_percentage, seed=seed,
        streaming=data_args.streaming, streaming_validation_documents=data_args.streaming_validation_documents,
    ), None  # fmt: skip


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
