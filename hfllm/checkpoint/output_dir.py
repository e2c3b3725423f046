"""The output-folder policy of every command that writes one: empty, resumable or refused, checked before any work."""

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..errors import HfllmError
from ..recipe import RECIPE_FILE
from .validation import checkpoint_problem, find_checkpoint


def check_output_dir(
    output_dir: str | Path,
    *,
    run: Any = None,
    resume: str | bool | None = None,
    overwrite: bool = False,
    session_keys: frozenset[str] = frozenset(),
) -> str | None:
    """Check an output folder before any work; returns the checkpoint to resume from, or None.

    A new or empty folder is always fine; a file is refused. Without `run` (convert, export, merge) any content is
    refused. With `run` (a `Recipe` of a training command): a folder holding another command's files is refused; a
    folder holding a run of a different recipe (keys outside `session_keys` differ) is refused unless `overwrite`;
    the same run is refused unless resuming (`resume`: true/"last" for the newest complete checkpoint-*, see
    `find_checkpoint`, or the path of a complete checkpoint).
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise HfllmError(f"output folder '{out}' is a file; give a folder path")
    existing = next(parent for parent in out.absolute().parents if parent.exists())  # the root always exists
    if not existing.is_dir():
        raise HfllmError(f"output folder '{out}' cannot be created: '{existing}' is a file; give a folder path")
    if not out.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise HfllmError(f"output folder '{out}' cannot be created: '{existing}' is not writable; choose another path")
    if resume not in (None, False, "false", "False"):
        if str(resume).lower() in ("true", "last"):
            checkpoint = find_checkpoint(out) if out.is_dir() else None
            if checkpoint is None:
                raise HfllmError(f"no complete checkpoint-* folder in {out} to resume from; train first or give a "
                                 "checkpoint path")
        else:
            checkpoint = str(resume)
            if not Path(checkpoint).is_dir():
                raise HfllmError(f"checkpoint '{checkpoint}' does not exist; give a checkpoint-* folder or 'true' for the last one")
            problem = checkpoint_problem(checkpoint)
            if problem is not None:
                raise HfllmError(f"checkpoint '{checkpoint}' is incomplete or corrupt ({problem}); give another "
                                 "checkpoint, or 'true' for the newest complete one")
        if run is not None and (out / RECIPE_FILE).is_file():
            _refuse_different_run(out, run, session_keys)
        return checkpoint
    if not out.exists() or not any(out.iterdir()):
        return None
    if run is None:
        raise HfllmError(f"output folder '{out}' is not empty; choose a new folder or remove it first")
    if not (out / RECIPE_FILE).is_file():
        raise HfllmError(f"output_dir {out} is not empty and holds no hfllm run; choose a new or empty folder")
    if overwrite:
        return None
    _refuse_different_run(out, run, session_keys)
    raise HfllmError(
        f"output_dir {out} already holds this run; continue it with --resume_from_checkpoint true, "
        "or start over with --overwrite_output_dir true"
    )


def _refuse_different_run(out: Path, run, session_keys: frozenset[str]) -> None:
    previous = yaml.safe_load((out / RECIPE_FILE).read_text(encoding="utf-8")) or {}
    for key in sorted(set(previous) | set(run.resolved)):
        if key in session_keys:
            continue
        before, now = previous.get(key, run.defaults.get(key)), run.value(key)
        if before != now:
            raise HfllmError(
                f"output_dir {out} holds a different run ({key} was {before!r}, now {now!r}); "
                "choose another output_dir, or set overwrite_output_dir: true to replace it"
            )


def clear_output_dir(output_dir: str | Path) -> None:
    """Delete an earlier hfllm run in output_dir (after `check_output_dir` allowed overwriting it)."""
    out = Path(output_dir)
    if (out / RECIPE_FILE).is_file():
        shutil.rmtree(out)
