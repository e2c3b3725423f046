"""The output folder: refusing to mix runs, the resolved recipe, and run metadata (git commit, versions, data hash)."""

import hashlib
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from transformers.trainer_utils import get_last_checkpoint

from ..errors import HfllmError
from .args import SESSION_KEYS, recipe_default

RECIPE_FILE = "recipe.yaml"
RUN_INFO_FILE = "run_info.json"
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "numpy", "schedulefree")


def check_output_dir(output_dir: str, resolved: dict[str, Any], resume: str | None, overwrite: bool) -> str | None:
    """Validate output_dir against this run before any work; returns the checkpoint to resume from (or None).

    A folder holding another hfllm run (different recipe) is refused; a folder holding this run is refused unless
    resuming; `overwrite` allows replacing an earlier hfllm run (deleted by `prepare_output_dir`)."""
    out = Path(output_dir)
    if resume:
        if resume.lower() in ("true", "last"):
            checkpoint = get_last_checkpoint(str(out)) if out.is_dir() else None
            if checkpoint is None:
                raise HfllmError(f"no checkpoint-* folder in {out} to resume from; train first or give a checkpoint path")
        else:
            checkpoint = resume
            if not Path(checkpoint).is_dir():
                raise HfllmError(f"checkpoint '{checkpoint}' does not exist; give a checkpoint-* folder or 'true' for the last one")
        if (out / RECIPE_FILE).is_file():
            _refuse_different_run(out, resolved)
        return checkpoint
    if not out.exists() or not any(out.iterdir()):
        return None
    if not (out / RECIPE_FILE).is_file():
        raise HfllmError(f"output_dir {out} is not empty and holds no hfllm run; choose a new or empty folder")
    if overwrite:
        return None
    _refuse_different_run(out, resolved)
    raise HfllmError(
        f"output_dir {out} already holds this run; continue it with --resume_from_checkpoint true, "
        "or start over with --overwrite_output_dir true"
    )


def _refuse_different_run(out: Path, resolved: dict[str, Any]) -> None:
    previous = yaml.safe_load((out / RECIPE_FILE).read_text(encoding="utf-8")) or {}
    for key in sorted(set(previous) | set(resolved)):
        if key in SESSION_KEYS:
            continue
        before, now = previous.get(key, recipe_default(key)), resolved.get(key, recipe_default(key))
        if before != now:
            raise HfllmError(
                f"output_dir {out} holds a different run ({key} was {before!r}, now {now!r}); "
                "choose another output_dir, or set overwrite_output_dir: true to replace it"
            )


def prepare_output_dir(output_dir: str, overwrite: bool) -> None:
    """Create output_dir, first deleting an earlier hfllm run in it when `overwrite` (checked by check_output_dir)."""
    out = Path(output_dir)
    if overwrite and (out / RECIPE_FILE).is_file():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def write_recipe(output_dir: str, resolved: dict[str, Any]) -> None:
    """The resolved recipe, re-runnable as is: `hfllm pretrain OUTPUT_DIR/recipe.yaml`."""
    kept = {k: v for k, v in resolved.items() if k not in ("resume_from_checkpoint", "overwrite_output_dir", "stop_at_step")}
    (Path(output_dir) / RECIPE_FILE).write_text(yaml.safe_dump(kept, sort_keys=False, allow_unicode=True), "utf-8")


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
    """sha256 of each split's token ids (so it covers the text, the tokenizer and the packing)."""
    hashes = {}
    for split, dataset in packed.items():
        digest = hashlib.sha256()
        for batch in dataset.with_format("numpy").iter(batch_size=4096):
            digest.update(batch["input_ids"].astype("int64").tobytes())
        hashes[split] = digest.hexdigest()
    return hashes


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's JSON (vocabulary, merges, special tokens, pre/post-processing)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def write_run_info(output_dir: str, info: dict[str, Any]) -> None:
    info = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "git": git_commit(),
        "versions": package_versions(),
        **info,
    }
    (Path(output_dir) / RUN_INFO_FILE).write_text(json.dumps(info, indent=2, default=str), "utf-8")
