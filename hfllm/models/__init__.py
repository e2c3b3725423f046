"""hfllm's model family, registered with transformers' Auto classes on import.

`register_for_auto_class` makes `save_pretrained` copy `configuration_hfllm.py` and `modeling_hfllm.py` (with
`mamba2_hfllm.py`, which it imports relatively) next to the weights, so a checkpoint loads with
`trust_remote_code=True` where hfllm is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_hfllm import HfllmConfig, HfllmConfigError
from .modeling_hfllm import HfllmForCausalLM, HfllmModel, HfllmPreTrainedModel
from .presets import PRESETS, get_preset, parameter_counts, preset_parameter_counts

AutoConfig.register("hfllm", HfllmConfig, exist_ok=True)
AutoModel.register(HfllmConfig, HfllmModel, exist_ok=True)
AutoModelForCausalLM.register(HfllmConfig, HfllmForCausalLM, exist_ok=True)
HfllmConfig.register_for_auto_class()
HfllmModel.register_for_auto_class("AutoModel")
HfllmForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "HfllmConfig",
    "HfllmConfigError",
    "HfllmForCausalLM",
    "HfllmModel",
    "HfllmPreTrainedModel",
    "PRESETS",
    "get_preset",
    "parameter_counts",
    "preset_parameter_counts",
]
