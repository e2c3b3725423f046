"""File digests shared by the commands that key, hash or publish files (the llama.cpp engine's cache, `hfllm push`)."""

import hashlib
from pathlib import Path


def sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
