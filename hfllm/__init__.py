"""hfllm: a Hugging Face-native toolkit from raw text to a deployed chat model.

Importing hfllm registers its model family with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`.
"""

__version__ = "0.1.0"

from .models import HfllmConfig, HfllmForCausalLM, HfllmModel, get_preset  # noqa: E402  (registers Auto classes)

__all__ = ["HfllmConfig", "HfllmForCausalLM", "HfllmModel", "get_preset", "__version__"]
