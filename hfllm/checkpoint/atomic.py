"""Outputs written aside and published whole: a folder or file appears under its name only when complete."""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import DiskFull, is_disk_full

MODEL_MARKERS = ("config.json", "adapter_config.json")  # the files that make a folder loadable (`spec_kind`)


@contextlib.contextmanager
def atomic_output(
    target: str | Path, *, folder: bool = True, keep_existing: bool = False, merge: bool = False,
    staging: str | Path | None = None, needs: int | None = None,
) -> Iterator[Path]:
    """Write `target` (a folder, or a file with `folder=False`) so that it appears only when complete.

    Yields a temporary sibling path (an empty folder, or a file path); when the block ends without error it is
    renamed to `target`, which may be absent or an empty folder. On error it is deleted and `target` is untouched.
    With `keep_existing`, a `target` another process completed meanwhile is kept and this copy dropped.
    With `merge`, `target` may be a non-empty folder (a training run's output_dir, with its checkpoints): the written
    files are moved into it one by one, each with `os.replace`, an earlier model's config.json / adapter_config.json
    removed first and the new ones moved last, so `load` never sees a half-replaced model. `staging` fixes the
    temporary folder's path (several processes writing one output must agree on it); it is emptied first.
    A full disk (ENOSPC, also inside a library's error) becomes `DiskFull`, naming `target`, the bytes it `needs`
    (the caller's estimate; unknown without one) and the bytes free.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if staging is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    else:
        tmp = Path(staging)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    written = tmp if folder else tmp / target.name
    try:
        yield written
        if merge and target.is_dir() and any(target.iterdir()):
            _move_into(written, target)
            return
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        try:
            os.replace(written, target)
        except OSError:
            if not (keep_existing and target.exists()):
                raise
    except Exception as error:
        if is_disk_full(error) and not isinstance(error, DiskFull):
            shutil.rmtree(tmp, ignore_errors=True)  # first: the free space is then what the user has
            raise DiskFull(target, needs) from error
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into(source: Path, target: Path) -> None:
    """Move every entry of `source` into the folder `target` (replacing same-named ones), MODEL_MARKERS last."""
    for marker in MODEL_MARKERS:
        (target / marker).unlink(missing_ok=True)
    entries = sorted(source.iterdir(), key=lambda path: (path.name in MODEL_MARKERS, path.name))
    for entry in entries:
        destination = target / entry.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(entry, destination)
