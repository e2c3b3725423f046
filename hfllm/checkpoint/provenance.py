"""Provenance of a run's weights: the sha256 of every weights file of the final model and of each checkpoint, kept in
run_info.json (written by hfllm/training/run_info.py:record_weights after each atomic move), and `hfllm verify
RUN_DIR`, which recomputes them and names any file that changed (docs/reliability.md#provenance).

    result = verify("runs/tiny")     # VerifyResult: matched, changed, missing, unrecorded
    result.ok                        # every recorded file is there with its recorded hash, none unrecorded

Exit codes of the command: 0 all match, 4 a file changed, is missing or is not recorded, 2 bad input (not a folder, no
run_info.json or no hashes in it).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ArgumentParser, HfllmError
from ..files import sha256

RUN_INFO_FILE = "run_info.json"
WEIGHTS_KEY = "weights_sha256"  # run_info.json: {path relative to the run folder: sha256}, as `sha256sum` lists them
MISMATCH_EXIT = 4
TORCH_WEIGHTS = ("pytorch_model", "adapter_model")  # the names of .bin files that hold weights


def weights_files(folder: Path) -> list[Path]:
    """The weights files of a model or checkpoint folder: safetensors files (shards and adapters included), torch
    weights (pytorch_model*.bin, adapter_model.bin) and DeepSpeed's model states (global_step*/): not optimizer,
    scheduler, RNG states or training_args.bin."""
    files = [path for path in folder.iterdir() if path.is_file() and (
        path.suffix == ".safetensors" or (path.suffix == ".bin" and path.name.startswith(TORCH_WEIGHTS)))]
    files += folder.glob("global_step*/*model_states.pt")
    return sorted(files)


def weights_hashes(run_dir: Path, folder: Path) -> dict[str, str]:
    """{path relative to `run_dir`: sha256} of `folder`'s weights files (`folder`: `run_dir` or one of its
    checkpoints)."""
    return {path.relative_to(run_dir).as_posix(): sha256(path) for path in weights_files(folder)}


def present_weights(run_dir: Path) -> set[str]:
    """The weights files a run folder holds now: the final model's and every checkpoint-N's."""
    folders = [run_dir, *(path for path in run_dir.glob("checkpoint-*") if path.is_dir())]
    return {path.relative_to(run_dir).as_posix() for folder in folders for path in weights_files(folder)}


@dataclass
class VerifyResult:
    """What `verify` found: each recorded file matched, changed (recorded sha256, sha256 now) or missing, and the
    weights files present that run_info.json does not list."""

    run_dir: Path
    matched: list[str] = field(default_factory=list)
    changed: dict[str, tuple[str, str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.unrecorded)

    def lines(self) -> list[str]:
        lines = [f"changed: {name} (sha256 {old[:12]}... in {RUN_INFO_FILE}, now {new[:12]}...)"
                 for name, (old, new) in self.changed.items()]
        lines += [f"missing: {name}" for name in self.missing]
        lines += [f"not recorded: {name} (not in {RUN_INFO_FILE})" for name in self.unrecorded]
        checked = len(self.matched) + len(self.changed) + len(self.missing)
        if self.ok:
            return [f"{self.run_dir}: all {checked} weights files match {RUN_INFO_FILE}"]
        return lines + [f"{self.run_dir}: {len(self.matched)} of {checked} recorded weights files match; "
                        f"{len(lines)} problem(s) above"]


def recorded_hashes(run_dir: str | Path) -> dict[str, str]:
    """run_info.json's weights hashes; HfllmError when `run_dir` is not a run folder that has them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HfllmError(f"'{run_dir}' is not a folder; give a run's output_dir")
    info_file = run_dir / RUN_INFO_FILE
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HfllmError(f"'{run_dir}' has no {RUN_INFO_FILE}; give the output_dir of an hfllm training run") from None
    except ValueError as error:
        raise HfllmError(f"'{info_file}' is not valid JSON ({error}); it cannot be checked") from None
    hashes = info.get(WEIGHTS_KEY) if isinstance(info, dict) else None
    if not hashes:
        raise HfllmError(f"'{info_file}' records no weights hashes ({WEIGHTS_KEY}); the run was saved before hfllm "
                         "recorded them, or saved no model yet")
    return hashes


def verify(run_dir: str | Path) -> VerifyResult:
    """Recompute the sha256 of every weights file run_info.json records and compare (HfllmError: bad input)."""
    run_dir = Path(run_dir)
    hashes = recorded_hashes(run_dir)
    result = VerifyResult(run_dir)
    for name, recorded in sorted(hashes.items()):
        path = run_dir / name
        if not path.is_file():
            result.missing.append(name)
        elif (now := sha256(path)) != recorded:
            result.changed[name] = (recorded, now)
        else:
            result.matched.append(name)
    result.unrecorded = sorted(present_weights(run_dir) - set(hashes))
    return result


def main(argv: list[str], prog: str) -> int:
    """`hfllm verify RUN_DIR`: exit 0 when every weights file matches run_info.json, 4 when one does not."""
    parser = ArgumentParser(prog=prog, description="Check a run's weights files against the sha256 hashes in its "
                                                   "run_info.json.")
    parser.add_argument("run_dir", help="a training run's output_dir (it holds run_info.json)")
    result = verify(parser.parse_args(argv).run_dir)
    print("\n".join(result.lines()))
    return 0 if result.ok else MISMATCH_EXIT
