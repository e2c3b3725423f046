"""The model of a recipe: a preset (new weights, vocabulary from the tokenizer) or a model folder (continued
pretraining), checked against the block size and the tokenizer before anything is trained."""

from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

from ..errors import HfllmError
from ..models import get_preset


def resolve_config(model: str, overrides: dict[str, Any], block_size: int) -> PreTrainedConfig:
    """The model config (vocabulary not set yet for presets); raises if `block_size` does not fit."""
    if Path(model).is_dir():
        try:
            config = AutoConfig.from_pretrained(model, **overrides)
        except (OSError, ValueError) as error:
            raise HfllmError(f"could not load a model config from {model}: {str(error).splitlines()[0]}") from None
    else:
        config = get_preset(model, **overrides)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and block_size > max_positions:
        raise HfllmError(
            f"block_size {block_size} is above the model's max_position_embeddings {max_positions}; "
            f"lower block_size or set max_position_embeddings: {block_size}"
        )
    return config


def build_model(model: str, config: PreTrainedConfig, tokenizer, attn_implementation: str):
    """A preset gets new weights sized to the tokenizer; a folder is loaded and must cover the tokenizer's ids."""
    if Path(model).is_dir():
        if len(tokenizer) > config.vocab_size:
            raise HfllmError(
                f"the tokenizer has {len(tokenizer)} tokens but the model {model} has vocab_size {config.vocab_size}; "
                "use the model's own tokenizer (tokenizer: <model folder>)"
            )
        return AutoModelForCausalLM.from_pretrained(model, config=config, attn_implementation=attn_implementation)
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
