"""Bad user input: one exception type, an argparse that raises it, and the translation of the library errors that stem
from user input. The CLI (hfllm/cli.py) prints any of them as one line and exits non-zero; anything else is a bug and
keeps its traceback. `HFLLM_DEBUG=1` shows the traceback always (docs/reliability.md)."""

import argparse
import errno
import os
import sys


class HfllmError(Exception):
    """A problem with the user's input (recipe, file, model, data). The message names the thing and the fix.
    The CLI exits with `exit_code` (2)."""

    exit_code = 2


class TrainingHalted(HfllmError):
    """A run stopped by its health checks (non-finite loss or gradients, a loss spike with `spike_action: stop`, or
    weights that may not be saved): nothing non-finite was written. The CLI exits with code 3 (docs/reliability.md)."""

    exit_code = 3


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown flag, bad value, missing argument) raise `HfllmError`: one line from the
    CLI, exit 2, instead of argparse's usage block."""

    def error(self, message: str):
        raise HfllmError(f"{message}; see {self.prog} --help")

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
    errno.ENOSPC: "free some disk space or choose another output_dir",
    errno.EDQUOT: "free some disk space or choose another output_dir",
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
    if name == "SafetensorError":
        return HfllmError(f"a .safetensors file is truncated or corrupt ({first_line(error)}); save or copy the model "
                          "again")
    if isinstance(error, OSError) and error.errno in _OS_FIXES:
        where = f"'{error.filename}': " if error.filename else ""
        return HfllmError(f"{where}{error.strerror}; {_OS_FIXES[error.errno]}")
    return None
