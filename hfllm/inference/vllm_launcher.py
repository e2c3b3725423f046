"""`hfllm serve --server vllm`: `vllm serve` on MODEL's native transformers checkpoint, exported from hfllm's family
(adapters merged, GGUF dequantized) when needed, on a CUDA GPU."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ..assets import cache_dir
from ..checkpoint import atomic_output, spec_kind
from ..errors import HfllmError
from ..models.convert import export, load_as_native


def serve_vllm(spec: str, host: str, port: int, api_key: str | None, max_concurrency: int, dtype: str) -> int:
    """Run `vllm serve` on MODEL's native transformers checkpoint (exported from hfllm's family when needed)."""
    missing = [what for what, present in (("the vllm package (pip install vllm)", importlib.util.find_spec("vllm")),
                                          ("a CUDA GPU", torch.cuda.is_available())) if not present]
    if missing:
        raise HfllmError(f"--server vllm needs vLLM and a CUDA GPU; missing here: {' and '.join(missing)}; use "
                         "--server transformers")
    checkpoint = native_checkpoint(spec)
    command = ["vllm", "serve", checkpoint, "--served-model-name", spec, "--host", host, "--port", str(port),
               "--max-num-seqs", str(max_concurrency), "--dtype", dtype]
    env = dict(os.environ, **({"VLLM_API_KEY": api_key} if api_key else {}))  # not on the command line
    print(f"serving '{spec}' with vLLM from {checkpoint}", file=sys.stderr, flush=True)
    return subprocess.call(command, env=env)


def native_checkpoint(spec: str) -> str:
    """A checkpoint vLLM reads: MODEL itself when it is a native folder or a Hub id, else `hfllm export --to
    transformers` of it (adapters merged, GGUF dequantized) in ~/.cache/hfllm/vllm."""
    kind = spec_kind(spec)
    is_hfllm_folder = kind == "folder" and json.loads((Path(spec) / "config.json").read_text()).get("model_type") == "hfllm"
    if kind == "hub" or (kind == "folder" and not is_hfllm_folder):
        return spec
    cache = cache_dir() / "vllm"
    source = Path(spec).resolve()
    out = cache / f"{source.name}-{hashlib.sha1(str(source).encode()).hexdigest()[:8]}"
    if out.is_dir():
        return str(out)
    if is_hfllm_folder:
        return str(export(spec, out))
    native, tokenizer = load_as_native(spec)
    with atomic_output(out) as tmp:
        native.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(out)
