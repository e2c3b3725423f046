"""hfllm: a Hugging Face-native toolkit from raw text to a deployed chat model.

Importing hfllm registers its model family with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`.
"""

__version__ = "0.1.0"

import logging  # noqa: E402

# bitsandbytes (imported by peft, hence by Trainer) warns at import that the optional `kernels` package is missing,
# then uses its own CPU code: harmless, and it would turn every one-line CLI error into two lines.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from .models import HfllmConfig, HfllmForCausalLM, HfllmModel, get_preset  # noqa: E402  (registers Auto classes)

__all__ = ["HfllmConfig", "HfllmForCausalLM", "HfllmModel", "get_preset", "__version__"]
