"""Bad user input: one exception type, an argparse that raises it, and the translation of the library errors that stem
from user input. The CLI (hfllm/cli.py) prints any of them as one line and exits non-zero; anything else is a bug and
keeps its traceback. `HFLLM_DEBUG=1` shows the traceback always (docs/reliability.md)."""

import argparse
import errno
import os
import re
import shutil
import sys
from pathlib import Path


class HfllmError(Exception):
    """A problem with the user's input (recipe, file, model, data). The message names the thing and the fix.
    The CLI exits with `exit_code` (2)."""

    exit_code = 2


class TrainingHalted(HfllmError):
    """A run stopped by its health checks (non-finite loss or gradients, a loss spike with `spike_action: stop`, or
    weights that may not be saved): nothing non-finite was written. The CLI exits with code 3 (docs/reliability.md)."""

    exit_code = 3


class DiskFull(HfllmError):
    """A write that ran out of disk space: the folder being written, the space it needs and the space free there,
    and the fix. `needed` None: unknown (more than is free)."""

    def __init__(self, folder: str | Path, needed: int | None = None):
        self.folder, self.needed, self.free = Path(folder), needed, free_bytes(folder)
        free = "?" if self.free is None else size_text(self.free)
        needs = f"needs about {size_text(needed)}" if needed else "needs more than is free"
        super().__init__(f"the disk is full: writing {self.folder} {needs}, {free} free there; free some disk space "
                         "or change output_dir (the folder written) to a disk with room")


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system of `path` (its nearest existing parent), None when unknown."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def size_text(n: int) -> str:
    """Bytes for people: 512 B, 1.5 MB, 3.2 GB (powers of 1000, as `df -H`)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how a disk-full error reads once a library (safetensors' Rust I/O) has turned it into text
_DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (28|122)\b")


def is_disk_full(error: BaseException | None) -> bool:
    """`error`, or an error it was raised from, is a full disk or quota: an OSError ENOSPC / EDQUOT, or a library's
    error with its text (SafetensorError: "I/O error: No space left on device (os error 28)")."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFull) or (isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS):
            return True
        if _DISK_FULL_TEXT.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown flag, bad value, missing argument) raise `HfllmError`: one line from the
    CLI, exit 2, instead of argparse's usage block."""

    def error(self, message: str):
        raise HfllmError(f"{message}; see {self.prog} --help")

    def parse_options(self, positionals: list[str], options: dict) -> argparse.Namespace:
        """The Python API's keyword options parsed as the command line that sets them, so that a bad value reads as
        the CLI's line: `max_new_tokens=64` is `--max_new_tokens=64`, True a switch given, False or None the default,
        a list an option repeated (or its values). A keyword no option takes is refused as an unknown flag."""
        switches = {option[2:]: action for action in self._actions for option in action.option_strings}
        argv = [os.fspath(value) for value in positionals]
        for key, value in options.items():
            action = switches.get(key)
            if action is not None and action.nargs == 0:  # a switch: --chat, --greedy
                argv += [f"--{key}"] if value else []
            elif isinstance(value, (list, tuple)):
                values = [os.fspath(v) if isinstance(v, os.PathLike) else str(v) for v in value]
                several = action is not None and action.nargs in ("+", "*")
                argv += [f"--{key}", *values] if several else [f"--{key}={v}" for v in values]
            elif value is not None:  # one token: a value such as "-1" is not taken for a flag
                argv.append(f"--{key}={os.fspath(value) if isinstance(value, os.PathLike) else value}")
        return self.parse_args(argv)

    def add_deprecated_alias(self, old: str, new: str, **kwargs) -> None:
        """`old` as a hidden alias of the option `new` (same destination and `kwargs`, e.g. choices) for one release:
        it still works and prints one line to stderr naming `new`."""
        self.add_argument(old, dest=new.lstrip("-"), action=_DeprecatedAlias, new=new, default=argparse.SUPPRESS,
                          help=argparse.SUPPRESS, **kwargs)


class _DeprecatedAlias(argparse.Action):
    """Stores the value like the new option and warns once per use: `PROG: --old is deprecated ...; use --new`."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stderr.write(f"{parser.prog}: {option_string} is deprecated and will be removed in the next release; "
                         f"use {self.new}\n")
        setattr(namespace, self.dest, values)


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message, or its type name when it has none."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def debug() -> bool:
    """`HFLLM_DEBUG=1`: every error shows its traceback, bad input included."""
    return os.environ.get("HFLLM_DEBUG", "").lower() not in ("", "0", "false", "no")


# the file-system errors that come from the user's paths or machine, not from hfllm: what to do about each
_OS_FIXES = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "choose a path on a writable file system",
    errno.ENOTDIR: "a part of the path is a file; give a folder path",
    errno.EISDIR: "it is a folder; give a file path",
    errno.ENAMETOOLONG: "give a shorter path",
}


def library_errors() -> tuple[type[BaseException], ...]:
    """The exception types `user_error` may translate, from the libraries already imported (so none is imported only
    for this). Evaluated by the CLI's `except` clause, that is only when an error is raised."""
    types: list[type[BaseException]] = [OSError]  # ConnectionError and huggingface_hub's offline errors included
    if "datasets" in sys.modules:
        from datasets.exceptions import DatasetGenerationError

        types.append(DatasetGenerationError)
    if "safetensors" in sys.modules:
        from safetensors import SafetensorError

        types.append(SafetensorError)
    return tuple(types)


def user_error(error: BaseException) -> HfllmError | None:
    """The one-line `HfllmError` for a library error that stems from the user's input or machine (an unreachable Hub,
    an unreadable data file, a corrupt weights file, a path that cannot be written), else None: a bug."""
    name = type(error).__name__
    if isinstance(error, ConnectionError) or name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return HfllmError(f"the Hugging Face Hub cannot be reached ({first_line(error)}); give a local file or folder "
                          "instead of a Hub name")
    if name == "DatasetGenerationError":
        return HfllmError(f"could not read the data ({first_line(error.__cause__ or error)}); check the data files")
    if is_disk_full(error):  # a writer that knows its folder and size raises DiskFull itself
        filename = getattr(error, "filename", None)
        if filename:
            return DiskFull(Path(filename).parent)
        return HfllmError(f"the disk is full ({first_line(error)}); free some disk space or change output_dir (the "
                          "folder written) to a disk with room")
    if name == "SafetensorError":
        return HfllmError(f"a .safetensors file is truncated or corrupt ({first_line(error)}); save or copy the model "
                          "again")
    if isinstance(error, OSError) and error.errno in _OS_FIXES:
        where = f"'{error.filename}': " if error.filename else ""
        return HfllmError(f"{where}{error.strerror}; {_OS_FIXES[error.errno]}")
    return None
