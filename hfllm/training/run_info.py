"""Run metadata in output_dir/run_info.json: command, git commit, package versions, data and tokenizer hashes, and the
sha256 of every weights file of the final model and of each checkpoint (`record_weights`, after each atomic move;
`hfllm verify` checks them: hfllm/checkpoint/provenance.py)."""

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset

from ..checkpoint.provenance import RUN_INFO_FILE, WEIGHTS_KEY, present_weights, weights_hashes

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "numpy", "schedulefree")


def git_commit() -> dict[str, Any]:
    """Commit of the hfllm source tree in use, and whether it had uncommitted changes (None outside git)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def data_hash(packed) -> dict[str, str]:
    """sha256 of each split's token ids, row after row as int64 (so it covers the text, the tokenizer and the
    packing). Read from the Arrow column directly: formatting rows as numpy batches took 1.5 s of start-up."""
    hashes = {}
    for split, dataset in packed.items():
        digest = hashlib.sha256()
        if isinstance(dataset, Dataset):
            # the rows as one flat array: the selected rows of the column, flattened (offsets and slices honoured)
            column = dataset.with_format("arrow")[:]["input_ids"]
            digest.update(pc.list_flatten(column).to_numpy().astype("int64").tobytes())
        else:  # a stream (its validation rows, taken)
            for row in dataset:
                digest.update(np.asarray(row["input_ids"], dtype="int64").tobytes())
        hashes[split] = digest.hexdigest()
    return hashes


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's JSON (vocabulary, merges, special tokens, pre/post-processing)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def write_run_info(output_dir: str, info: dict[str, Any]) -> None:
    """run_info.json at the start of a run; the weights hashes of a run it resumes are kept."""
    info = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "git": git_commit(),
        "versions": package_versions(),
        **info,
    }
    earlier = read_run_info(Path(output_dir))
    if earlier.get(WEIGHTS_KEY):
        info[WEIGHTS_KEY] = earlier[WEIGHTS_KEY]
    _write(Path(output_dir), info)


def record_weights(run_dir: str | Path, folder: str | Path) -> None:
    """The sha256 of each weights file of `folder` (the run folder itself: the final model; or a checkpoint-N in
    it), just moved into place, into run_dir/run_info.json; the entries of files no longer there (a rotated
    checkpoint, an earlier final model's shards) are dropped."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    present = present_weights(run_dir)
    hashes = {name: digest for name, digest in info.get(WEIGHTS_KEY, {}).items() if name in present}
    info[WEIGHTS_KEY] = dict(sorted({**hashes, **weights_hashes(run_dir, Path(folder))}.items()))
    _write(run_dir, info)


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """run_info.json's content, {} when there is none."""
    try:
        return json.loads((run_dir / RUN_INFO_FILE).read_text("utf-8"))
    except FileNotFoundError:
        return {}


def _write(run_dir: Path, info: dict[str, Any]) -> None:
    """run_info.json replaced whole (written aside, then renamed): a crash leaves the old one or the new one."""
    partial = run_dir / f".{RUN_INFO_FILE}.partial"
    partial.write_text(json.dumps(info, indent=2, default=str), "utf-8")
    os.replace(partial, run_dir / RUN_INFO_FILE)
