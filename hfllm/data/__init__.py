"""Pretraining data: the embedded Shakespeare corpus, text dataset loading, tokenizers, tokenize + pack.

`hfllm data ACTION ...`:
  shakespeare --out DIR            write DIR/train.txt and DIR/val.txt (documents separated by `<|endofdoc|>` lines)
  tokenizer --kind bpe|char ...    train a tokenizer on a corpus, save it to a folder and print its vocab report
  synth TASK --out DIR             synthetic task data (hfllm/data/synth.py)
"""

import importlib
import json
from pathlib import Path

from ..checkpoint import atomic_output, check_output_dir
from ..errors import ArgumentParser, HfllmError
from .corpus import (
    DOCUMENT_SEPARATOR,
    VALIDATION_PLAYS,
    clean_play,
    read_documents,
    shakespeare_corpus,
    write_documents,
)
from .loading import (
    DatasetConfig,
    Mixture,
    drop_validation_duplicates,
    load_files,
    load_text_datasets,
    load_text_mixture,
    mix_datasets,
)
from .packing import collate_blocks, collate_flat_blocks, tokenize_and_pack
from .tokenizer import check_round_trip, chatml_template, load_or_train_tokenizer, tokenizer_report, train_tokenizer

__all__ = [
    "DOCUMENT_SEPARATOR", "DatasetConfig", "Mixture", "VALIDATION_PLAYS", "chatml_template", "check_round_trip",
    "clean_play", "collate_blocks", "collate_flat_blocks", "drop_validation_duplicates", "load_files",
    "load_or_train_tokenizer", "load_text_datasets", "load_text_mixture", "main", "mix_datasets", "read_documents",
    "shakespeare_corpus", "tokenize_and_pack", "tokenizer_report", "train_tokenizer", "write_documents",
]  # fmt: skip


def _prepare_out(out: str) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise HfllmError(f"--out '{out}' is a file; give a folder path")
    return path


def shakespeare_main(argv: list[str], prog: str) -> int:
    parser = ArgumentParser(prog=prog, description="Write the cleaned Shakespeare corpus as text files.")
    parser.add_argument("--out", required=True, help="folder for train.txt and val.txt")
    args = parser.parse_args(argv)
    out = _prepare_out(args.out)
    corpus = shakespeare_corpus()
    out.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train.txt"), ("validation", "val.txt")):
        write_documents(corpus[split], out / name)
        print(f"{out / name}: {len(corpus[split])} plays, {sum(map(len, corpus[split])):,} characters")
    return 0


def tokenizer_main(argv: list[str], prog: str) -> int:
    parser = ArgumentParser(prog=prog, description="Train a tokenizer on a corpus and save it.")
    parser.add_argument("--kind", choices=["bpe", "char"], default="bpe")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--dataset", default=None, help="'shakespeare' (default when no --train-files) or a Hub id")
    parser.add_argument("--train-files", nargs="+", default=None, help="local files or globs")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--out", required=True, help="folder to save the tokenizer to")
    args = parser.parse_args(argv)
    out = _prepare_out(args.out)
    dataset = args.dataset or (None if args.train_files else "shakespeare")
    data = load_text_datasets(dataset, args.train_files, text_column=args.text_column)
    tokenizer = train_tokenizer(args.kind, data["train"]["text"], args.vocab_size)
    report = tokenizer_report(tokenizer, data["validation"]["text"])  # raises before anything is written
    check_output_dir(out)
    with atomic_output(out) as tmp:
        tokenizer.save_pretrained(tmp)
    print(json.dumps({"out": str(out), **{k: round(v, 4) for k, v in report.items()}}))
    return 0


ACTIONS = {
    "shakespeare": "hfllm.data:shakespeare_main",
    "tokenizer": "hfllm.data:tokenizer_main",
    "synth": "hfllm.data.synth:synth_main",
}


def main(argv: list[str], prog: str) -> int | None:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} ACTION [args...]\n\nactions:\n" + __doc__.split(":\n", 1)[1].split("\n\n")[0].rstrip())
        return 0
    action, rest = argv[0], argv[1:]
    if action not in ACTIONS:
        raise HfllmError(f"unknown data action '{action}'; choose from: {', '.join(ACTIONS)}")
    module_name, function_name = ACTIONS[action].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        raise HfllmError(f"the '{action}' action needs {module_name}, which is not in this hfllm") from error
    return getattr(module, function_name)(rest, prog=f"{prog} {action}")
