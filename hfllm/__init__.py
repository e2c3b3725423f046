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

from .models import HfllmConfig, HfllmForCausalLM, HfllmModel, get_preset  # noqa: E402  (registers Auto classes)

__all__ = ["HfllmConfig", "HfllmForCausalLM", "HfllmModel", "get_preset", "__version__"]
