"""Shared helpers for the pretraining tests: a small corpus and overrides that make any recipe run in seconds."""

import json
from pathlib import Path

import torch

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
)

# a 1-layer, 32-wide model, char tokenizer, 16-token blocks, local data: any recipe trains in seconds
TINY = [
    "--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "1", "--num_attention_heads", "2",
    "--num_key_value_heads", "1", "--tokenizer", "char", "--block_size", "16", "--per_device_train_batch_size", "2",
    "--per_device_eval_batch_size", "4", "--global_batch_size", "null", "--global_batch_tokens", "null",
    "--max_eval_samples", "4", "--report_to", "none", "--disable_tqdm", "true", "--num_samples", "1",
    "--sample_max_new_tokens", "8", "--dataloader_num_workers", "0", "--torch_compile", "false",
    "--attn_implementation", "sdpa", "--preprocessing_num_workers", "null",
]


def write_corpus(folder: Path, copies: int = 40) -> tuple[str, str]:
    """(train file, validation file) of repeated dialogue."""
    train, validation = folder / "train.txt", folder / "validation.txt"
    train.write_text(CORPUS * copies, encoding="utf-8")
    validation.write_text(CORPUS * 4, encoding="utf-8")
    return str(train), str(validation)


def data_args(folder: Path) -> list[str]:
    train, validation = write_corpus(folder)
    return ["--dataset", "null", "--train_files", train, "--validation_files", validation]


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]


def losses(output_dir: Path) -> list[float]:
    return [entry["loss"] for entry in log_history(output_dir) if "loss" in entry]


def single_thread():
    """Two busy cores make multi-threaded tiny matmuls ~100x slower; the tests use one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads
