"""hfllm: a Hugging Face-native toolkit from raw text to a deployed chat model.

Importing hfllm registers its model family with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`.
"""

__version__ = "0.1.0"

import logging  # noqa: E402

# bitsandbytes (imported by peft, hence by Trainer) tries at import to fetch a CPU kernel from the Hub through the
# `kernels` package (a transformers 5.25 dependency), and each of them warns when it cannot (offline, untrusted); then
# bitsandbytes uses its own CPU code. Harmless, and it would turn every one-line CLI error into two lines. Only those
# notices are dropped: kernels' warnings about kernels a recipe asks for still show.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: "kernels-community/quantization-bitsandbytes" not in record.getMessage())

from .errors import HfllmError  # noqa: E402
from .models import HfllmConfig, HfllmForCausalLM, HfllmModel, get_preset  # noqa: E402  (registers Auto classes)

# The Python API: one function per stage, each the same path as its `hfllm` command (the command parses its argv and
# calls it). Imported on first use, so `import hfllm` stays light. docs/api.md.
API: dict[str, str] = {
    "pretrain": "hfllm.training.pretrain:pretrain",
    "sft": "hfllm.training.align:sft",
    "dpo": "hfllm.training.align:dpo",
    "orpo": "hfllm.training.align:orpo",
    "kto": "hfllm.training.align:kto",
    "grpo": "hfllm.training.align:grpo",
    "RunResult": "hfllm.training.lifecycle:RunResult",
    "synth": "hfllm.data.synth:synth",
    "doctor": "hfllm.diagnostics:doctor",
    "plan": "hfllm.training.plan:plan",
    "evaluate": "hfllm.evaluation.run:evaluate",
    "generate": "hfllm.inference.generate:generate",
    "chat": "hfllm.inference.chat:chat",
    "convert": "hfllm.models.convert:convert",
    "export": "hfllm.models.convert:export",
    "push": "hfllm.shipping.push:push",
    "ablate": "hfllm.experiments.ablate:ablate",
    "scaling": "hfllm.experiments.scaling:scaling",
}

__all__ = ["HfllmConfig", "HfllmError", "HfllmForCausalLM", "HfllmModel", "get_preset", "__version__", *API]


def __getattr__(name: str):
    if name not in API:
        raise AttributeError(f"module 'hfllm' has no attribute '{name}'")
    import importlib

    module_name, attribute = API[name].split(":")
    value = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *API})
