"""Trainer checkpoints: whether a checkpoint-N folder (or any saved model folder) is complete, and the newest complete
one in a run's folder."""

import json
import re
import sys
import zipfile
from pathlib import Path

from ..errors import first_line

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR + "-" + step


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from (a few words), or None when it is complete: its
    trainer_state.json parses and its weights pass `weights_problem`."""
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return "trainer_state.json does not parse"
    return weights_problem(folder)


def weights_problem(folder: str | Path) -> str | None:
    """Why a saved model or checkpoint folder is incomplete (a few words), or None: it holds model weights, every
    shard its index names is there, every safetensors header reads (a truncated file fails) and every torch-saved
    file (optimizer, scheduler, RNG state) has its zip directory, which torch writes last."""
    folder = Path(folder)
    files = [path for path in folder.iterdir() if path.is_file()]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, OSError):
            return f"{index.name} does not parse"
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            return f"shard {missing[0]} is missing"
    weights = [path for path in files if path.suffix == ".safetensors" or path.name in ("pytorch_model.bin", "adapter_model.bin")]
    if not weights and not any(path.is_dir() for path in folder.glob("global_step*")):  # DeepSpeed keeps its own
        return "no model weights"
    from safetensors import safe_open

    for path in sorted(files):
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
            except Exception as error:  # safetensors raises its own error type (and OSError for unreadable files)
                return f"{path.name} is unreadable: {first_line(error)}"
        elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
            return f"{path.name} is truncated or not a torch file"
    return None


def find_checkpoint(output_dir: str | Path, *, warn: bool = True) -> str | None:
    """The newest complete checkpoint-N folder in `output_dir` (see `checkpoint_problem`), or None. Incomplete or
    corrupt ones are skipped, each with a warning on stderr naming it."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = [(int(match.group(1)), path) for path in out.iterdir()
             if path.is_dir() and (match := CHECKPOINT_NAME.match(path.name))]
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        if warn:
            print(f"warning: skipping {path}: incomplete or corrupt ({problem}); trying an older checkpoint",
                  file=sys.stderr, flush=True)
    return None
