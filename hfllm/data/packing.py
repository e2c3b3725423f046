"""Tokenize documents and pack them into fixed blocks of `block_size` tokens for causal-LM pretraining.

Each document becomes `tokenizer(text)` (the tokenizer's own special tokens: hfllm and Llama tokenizers prepend
BOS, GPT-2/Qwen/SmolLM2 ones add nothing) followed by one EOS. Documents are concatenated and cut into blocks of
exactly `block_size` tokens; the tokens left at the end of each packing batch (`pack_batch_size` documents) that
do not fill a block are dropped. Rows hold `input_ids` and, with `per_document_positions`, `position_ids` that
restart at 0 at the start of every block and after every EOS. There are no labels: `collate_blocks` (or the
model) uses labels = input_ids and transformers' ForCausalLMLoss shifts them once.

Caching: datasets caches each `map` by fingerprint next to file-backed data. In-memory text (the embedded
Shakespeare corpus, `Dataset.from_dict`) has no such place, so with `cache_dir` its tokens and blocks are written
there under the same fingerprints (`tokens-<hash>.arrow`, `blocks-<hash>.arrow`), and a later run with the same text,
tokenizer and block settings memory-maps them instead of tokenizing again (`hfllm pretrain` uses
`$HFLLM_CACHE/tokenized`). The fingerprints cover the text (datasets' hash of its table), the tokenizer's JSON and
EOS id, block_size, per_document_positions and pack_batch_size; anything else gives new files.

What `position_ids` do, read from transformers 5.23 and checked on CPU with a tiny Llama:
  - sdpa / eager / flex: `create_causal_mask` calls `find_packed_sequence_indices(position_ids)` and builds a
    block-diagonal causal mask (no attention across documents) ONLY when `attention_mask` is None and there is no
    cache (`use_cache=False`, which Trainer sets by default). `collate_blocks` therefore returns no attention mask.
    `DataCollatorForLanguageModeling` adds an all-ones attention_mask, which turns the detection off: the
    position ids then only restart RoPE positions and documents still attend to each other.
  - flash_attention_2/3: varlen attention is derived from position_ids only for a batch of one flattened row
    (`_is_packed_sequence` requires batch_size == 1); with batch > 1 attention would cross documents. Pretraining
    with FlashAttention therefore uses `collate_flat_blocks`: the batch as one row of B*T tokens, no padding, with
    the varlen kernels' cu_seq_lens / max_length computed once per batch from the per-document positions.
"""

import itertools
from pathlib import Path

import torch
from transformers import DataCollatorWithFlattening
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from datasets import DatasetDict, IterableDataset, IterableDatasetDict
from datasets.fingerprint import Hasher

from ..errors import HfllmError


def _positions(block: list[int], eos_id: int) -> list[int]:
    """0, 1, 2, ... restarting after each EOS: [a b EOS c d] -> [0 1 2 0 1]."""
    positions, position = [], 0
    for token in block:
        positions.append(position)
        position = 0 if token == eos_id else position + 1
    return positions


def _pack(batch: dict[str, list[list[int]]], block_size: int, eos_id: int, positions: bool) -> dict[str, list]:
    stream = list(itertools.chain.from_iterable(batch["input_ids"]))
    usable = len(stream) // block_size * block_size
    blocks = [stream[i : i + block_size] for i in range(0, usable, block_size)]
    packed = {"input_ids": blocks}
    if positions:
        packed["position_ids"] = [_positions(block, eos_id) for block in blocks]
    return packed


def tokenize_and_pack(
    data: DatasetDict | IterableDatasetDict,
    tokenizer,
    block_size: int,
    num_proc: int | None = None,
    seed: int = 0,
    per_document_positions: bool = True,
    pack_batch_size: int = 1000,
    cache_dir: str | Path | None = None,
) -> DatasetDict | IterableDatasetDict:
    """Text splits (column "text") -> splits of packed blocks (`input_ids`, optionally `position_ids`).

    The train split is shuffled with `seed` (a stream: with a 10,000-row buffer). `num_proc` applies to map-style
    datasets; results are cached by datasets' fingerprints when the data came from files. The tokenization
    fingerprint comes from the tokenizer's JSON, so a tokenizer saved and loaded elsewhere (another rank) hits the
    cache written with the one it was saved from. `cache_dir`: where in-memory splits are cached (module docstring).
    """
    if block_size < 2:
        raise HfllmError(f"block_size must be at least 2 (an input and its next-token target), got {block_size}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise HfllmError("the tokenizer has no eos_token; set one so documents can be separated when packing")
    streaming = isinstance(data["train"], IterableDataset)

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=True)["input_ids"]
        return {"input_ids": [row + [eos_id] for row in ids]}

    def pack(batch: dict[str, list[list[int]]]) -> dict[str, list]:
        return _pack(batch, block_size, eos_id, per_document_positions)

    packed = {}
    for split, part in data.items():
        if streaming:
            tokens = part.map(tokenize, batched=True, remove_columns=["text"])
            packed[split] = tokens.map(pack, batched=True, batch_size=pack_batch_size, remove_columns=["input_ids"])
            if next(iter(packed[split]), None) is None:
                raise HfllmError(f"the {split} split packs into no block of block_size {block_size}; give more text")
            continue
        fingerprint = Hasher.hash([part._fingerprint, tokenizer.backend_tokenizer.to_str(), eos_id, "tokenize"])
        blocks_fingerprint = Hasher.hash([fingerprint, block_size, per_document_positions, pack_batch_size, "pack"])
        in_memory = cache_dir is not None and not part.cache_files  # file-backed data is cached by datasets itself
        tokens = part.map(
            tokenize, batched=True, num_proc=num_proc, remove_columns=["text"], desc=f"Tokenizing {split}",
            new_fingerprint=fingerprint, cache_file_name=_cache_file(cache_dir, "tokens", fingerprint, in_memory),
        )
        packed[split] = tokens.map(
            pack, batched=True, batch_size=pack_batch_size, num_proc=num_proc, remove_columns=["input_ids"],
            desc=f"Packing {split} into blocks of {block_size}", new_fingerprint=blocks_fingerprint,
            cache_file_name=_cache_file(cache_dir, "blocks", blocks_fingerprint, in_memory),
        )  # fmt: skip
        if len(packed[split]) == 0:
            available = sum(len(row) for row in tokens["input_ids"])
            raise HfllmError(
                f"the {split} split has {available} tokens, fewer than one block of block_size {block_size}; "
                f"lower block_size or give more text"
            )
    if streaming:
        packed["train"] = packed["train"].shuffle(seed=seed, buffer_size=10_000)
        return IterableDatasetDict(packed)
    packed["train"] = packed["train"].shuffle(seed=seed)
    return DatasetDict(packed)


def _cache_file(cache_dir: str | Path | None, kind: str, fingerprint: str, use: bool) -> str | None:
    """The Arrow file of one cached `map` result (None: datasets decides, i.e. no file for in-memory data)."""
    if not use:
        return None
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return str(Path(cache_dir) / f"{kind}-{fingerprint}.arrow")


def collate_blocks(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Stack packed blocks into a batch: input_ids, labels (= input_ids; the loss shifts), position_ids if present.

    No attention_mask, on purpose: blocks have no padding, and without a mask sdpa/eager build per-document masks
    from position_ids (see the module docstring).
    """
    input_ids = torch.tensor([feature["input_ids"] for feature in features])  # (B, T)
    batch = {"input_ids": input_ids, "labels": input_ids.clone()}
    if "position_ids" in features[0]:
        batch["position_ids"] = torch.tensor([feature["position_ids"] for feature in features])  # (B, T)
    return batch


_flatten = DataCollatorWithFlattening(return_position_ids=False)  # rows -> one row; labels -100 at each row's start


def collate_flat_blocks(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor | int]:
    """The batch as one row for FlashAttention's varlen kernels: input_ids, labels, position_ids (1, B*T) and the
    kernels' cu_seq_lens_q/k (n_docs + 1,) int32 and max_length_q/k, one sequence per document piece.

    transformers' `DataCollatorWithFlattening` joins the rows; a row's first label is -100, so the last token of a
    row does not learn to predict the next row (the plain batch's loss covers the same B*(T-1) predictions). The
    sequences come from the per-document `position_ids` (transformers' `prepare_fa_kwargs_from_position_ids`: a new
    one wherever the position is 0), so no query attends across documents or rows; without per-document
    positions each row is one sequence.
    """
    batch = _flatten([{"input_ids": feature["input_ids"]} for feature in features])
    if "position_ids" in features[0]:
        positions = torch.tensor([p for feature in features for p in feature["position_ids"]])[None]  # (1, B*T)
    else:
        positions = torch.cat([torch.arange(len(feature["input_ids"])) for feature in features])[None]
    (cu_seq_lens_q, cu_seq_lens_k), (max_length_q, max_length_k) = prepare_fa_kwargs_from_position_ids(positions)
    return {
        **batch, "position_ids": positions,
        "cu_seq_lens_q": cu_seq_lens_q, "cu_seq_lens_k": cu_seq_lens_k,
        "max_length_q": int(max_length_q), "max_length_k": int(max_length_k),
    }


def cut_blocks(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """A batch of (B, T) blocks as (B * T / length, length) rows, for sequence-length warmup: the same tokens, each
    row attending only within itself. Position ids keep their values (RoPE is relative; a row starting mid-document
    is still one sequence for the packed-sequence mask)."""
    return {key: value.reshape(-1, length) if key in ("input_ids", "labels", "position_ids") else value
            for key, value in batch.items()}


# ----------------------------------------------------------------------------- how full SFT batches are
# TRL's SFT packing (`packing: true`, best-fit decreasing) puts whole samples into rows of `max_length` tokens; its
# padding-free collator joins a batch's rows into one row with per-sample `position_ids` (the same mask rule as
# above: no attention across samples). Without packing, each batch is padded to its longest sample.


def padded_fill(lengths: list[int], batch_size: int, seed: int = 0) -> float:
    """Share of real tokens in batches of `batch_size` samples (a seeded random order, as Trainer samples them)
    padded to their longest sample."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [[lengths[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]
    return sum(map(sum, batches)) / sum(len(batch) * max(batch) for batch in batches)


def packed_fill(seq_lengths: list[list[int]], max_length: int) -> float:
    """Share of real tokens in packed rows of `max_length` tokens (axolotl's packing efficiency)."""
    return sum(map(sum, seq_lengths)) / (len(seq_lengths) * max_length)


def batch_fill(dataset, args) -> str | None:
    """One line for the run log: the share of real tokens per batch, in packed rows (TRL's prepared SFT dataset has
    `seq_lengths` per row) or in batches padded to their longest sample; None for data without `input_ids`."""
    if "seq_lengths" in dataset.column_names:
        rows = dataset["seq_lengths"]
        return (f"packing: {sum(map(len, rows))} samples in {len(rows)} rows of {args.max_length} tokens, "
                f"{packed_fill(rows, args.max_length):.1%} real tokens per batch")
    if "input_ids" not in dataset.column_names:
        return None
    lengths = [len(ids) for ids in dataset["input_ids"]]
    batch_size = args.per_device_train_batch_size
    return (f"no packing: {len(lengths)} samples, {padded_fill(lengths, batch_size, args.seed):.1%} real tokens per "
            f"batch of {batch_size} padded to its longest")
