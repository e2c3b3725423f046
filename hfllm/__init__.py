"""hfllm: a Hugging Face-native toolkit from raw text to a deployed chat model."""

__version__ = "0.1.0"
