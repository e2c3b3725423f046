"""TEMPORARY stand-in for `hfllm.data` (written by another helper): same names and signatures, minimal behaviour.

Delete this file once main has `hfllm.data`; run_pretrain then imports the same names from there.
"""

import glob
import re
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..assets import shakespeare_plays_dir
from ..errors import HfllmError

VALIDATION_PLAYS = ("julius-caesar", "macbeth", "richard-ii", "the-tempest", "twelfth-night")
PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|endoftext|>", "<|unk|>"
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _clean(markdown: str) -> str:
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        if speaker := re.match(r"^\*\*(.+?)\*\*\s*$", line):
            line = speaker.group(1).strip() + ":"
        line = re.sub(r"^#{1,6}\s+", "", line)
        line = re.sub(r"\\(.)", r"\1", re.sub(r"[*_]", "", line))
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def _load_files(patterns: str | list[str], text_column: str) -> Dataset:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = sorted({f for p in patterns for f in (glob.glob(p) or [p])})
    for f in files:
        if not Path(f).is_file():
            raise HfllmError(f"data file '{f}' does not exist; check the path or glob in train_files/validation_files")
        if Path(f).stat().st_size == 0:
            raise HfllmError(f"data file '{f}' is empty; give a file with text")
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) != 1 or next(iter(suffixes)) not in BUILDERS:
        raise HfllmError(f"data files must share one suffix of {', '.join(BUILDERS)}; got {sorted(suffixes)}")
    builder = BUILDERS[suffixes.pop()]
    if builder == "text":
        data = Dataset.from_dict({"text": [Path(f).read_text(encoding="utf-8") for f in files]})
    else:
        data = datasets.load_dataset(builder, data_files=files, split="train")
    if text_column not in data.column_names:
        raise HfllmError(f"text column '{text_column}' not in {files[0]} (columns: {', '.join(data.column_names)}); set text_column")
    return data.select_columns([text_column]).rename_column(text_column, "text") if text_column != "text" else data.select_columns(["text"])


def load_text_datasets(dataset=None, train_files=None, validation_files=None, text_column="text",
                       validation_split_percentage=10.0, dataset_config=None, streaming=False, seed=0,
                       streaming_validation_documents=1000) -> DatasetDict:
    if (dataset is None) == (train_files is None):
        raise HfllmError("give exactly one data source: a dataset name ('shakespeare' or a Hub id) or train_files")
    if dataset == "shakespeare":
        files = dict(sorted((p.stem, p) for p in shakespeare_plays_dir().rglob("*.md")))
        split = {"train": [], "validation": []}
        for name, path in files.items():
            split["validation" if name in VALIDATION_PLAYS else "train"].append(_clean(path.read_text("utf-8")))
        data = DatasetDict({k: Dataset.from_dict({"text": v}) for k, v in split.items()})
    elif dataset is not None:
        hub = datasets.load_dataset(dataset, dataset_config)
        data = DatasetDict({"train": hub["train"], "validation": hub["validation"]})
    else:
        train = _load_files(train_files, text_column)
        if validation_files is not None:
            data = DatasetDict({"train": train, "validation": _load_files(validation_files, text_column)})
        else:
            parts = train.train_test_split(test_size=max(validation_split_percentage / 100, 1 / len(train)) if len(train) > 1 else None, seed=seed) if len(train) > 1 else {"train": train, "test": train}
            data = DatasetDict({"train": parts["train"], "validation": parts["test"]})
    if not any(t and t.strip() for t in data["train"]["text"]):
        raise HfllmError(f"{dataset or train_files} contains no text in the train split; give documents with text")
    return data


def train_tokenizer(kind: str, texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    if kind not in ("bpe", "char"):
        raise HfllmError(f"unknown tokenizer kind '{kind}'; choose 'bpe', 'char' or a path to a tokenizer folder")
    if kind == "bpe":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        backend.train_from_iterator(texts, trainer=trainer)
    else:
        chars = sorted({c for t in texts for c in t})
        vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK] + chars)}
        backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, backend.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK if kind == "char" else None, clean_up_tokenization_spaces=False,
                                   model_max_length=int(1e9))


def load_or_train_tokenizer(spec: str, texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    if spec in ("bpe", "char"):
        return train_tokenizer(spec, texts, vocab_size)
    if not Path(spec).is_dir():
        raise HfllmError(f"tokenizer '{spec}' is neither 'bpe', 'char' nor an existing tokenizer folder")
    return AutoTokenizer.from_pretrained(spec)


def tokenize_and_pack(dataset_dict: DatasetDict, tokenizer, block_size: int, num_proc: int | None = None,
                      seed: int = 0, per_document_positions: bool = False) -> DatasetDict:
    """Documents -> bos + tokens + eos, concatenated and cut into rows of `block_size` (remainder dropped)."""

    def pack(batch):
        ids = []
        for text in batch["text"]:
            ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        n = len(ids) // block_size * block_size
        return {"input_ids": [ids[i:i + block_size] for i in range(0, n, block_size)]}

    packed = dataset_dict.map(pack, batched=True, batch_size=1000, remove_columns=dataset_dict["train"].column_names, num_proc=num_proc)
    for split, data in packed.items():
        if len(data) == 0:
            raise HfllmError(f"the {split} split has fewer than block_size={block_size} tokens; give more text or lower block_size")
    return packed
