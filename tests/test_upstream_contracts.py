"""Every private upstream name hfllm leans on, named here, so that the next upstream rename fails one test that says
which name, not twenty that say something else. docs/layout.md lists the same names with the reason for each.

`python3 -m pytest -m upstream` runs these with the other contract tests (the checkpoint code's contracts under several
transformers releases, transformers serve's names, tensor parallel on two processes): a pre-flight of a few minutes
against whatever is installed, for example after `HFLLM_LATEST=1 bash setup.sh dev`.
"""

import importlib
import inspect

import pytest

pytestmark = pytest.mark.upstream


def _resolve(path: str):
    """'package.module:Attribute.attribute' -> the object."""
    module_name, _, attributes = path.partition(":")
    found = importlib.import_module(module_name)
    for attribute in attributes.split(".") if attributes else []:
        found = getattr(found, attribute)
    return found


# (upstream name, the parameters hfllm passes or receives, where hfllm uses it)
PRIVATE_NAMES = [
    # transformers.Trainer hooks that hfllm's trainers override and call through super()
    ("transformers:Trainer._evaluate", {"trial", "ignore_keys_for_eval"}, "training/trainer.py: evaluation time"),
    ("transformers:Trainer._clip_grad_norm", {"model"}, "training/health.py: gradient norm before clipping"),
    ("transformers:Trainer._get_grad_norm", {"model", "grad_norm"}, "training/health.py: non-finite gradient check"),
    ("transformers:Trainer._get_output_dir", {"trial"}, "training/saving.py: checkpoints written aside"),
    ("transformers:Trainer._save_checkpoint", {"model", "trial"}, "training/saving.py: checkpoints written aside"),
    ("transformers:Trainer._save", {"output_dir", "state_dict"}, "training/distributed.py: FSDP2 saves the own class"),
    # transformers modules and attributes outside the documented API
    ("transformers.modeling_flash_attention_utils:prepare_fa_kwargs_from_position_ids", {"position_ids"},
     "data/packing.py: FlashAttention varlen lengths from per-document positions"),
    ("transformers.distributed.tensor_parallel:TensorParallelLayer.install_forward", {"module", "mesh"},
     "models/modeling_hfllm.py: the hfllm_grad_sum tensor-parallel style"),
    ("transformers.distributed.tensor_parallel:ALL_PARALLEL_STYLES.register", set(),
     "models/modeling_hfllm.py: registers hfllm_grad_sum"),
    ("transformers:PreTrainedModel._init_weights", {"module"}, "models/convert.py: rotary buffers after conversion"),
    ("transformers.integrations.flex_attention:flex_attention_forward", {"position_bias"},
     "models/modeling_hfllm.py: ALiBi's bias under flex attention (check_alibi_support refuses without it)"),
    ("transformers.cache_utils:DYNAMIC_LAYER_TYPE_MAPPING", set(),
     "models/modeling_hfllm.py: DynamicCache(config=...) builds Mamba-2 layers' state caches ('linear_attention')"),
    ("transformers.cache_utils:LinearAttentionLayer.update_conv_state", {"conv_states", "conv_kernel_size"},
     "models/mamba2_hfllm.py: the conv state keeps the last mamba_d_conv inputs"),
    ("transformers.masking_utils:create_recurrent_attention_mask", {"config", "inputs_embeds", "attention_mask"},
     "models/modeling_hfllm.py: the (B, T) padding mask of Mamba-2 layers"),
    # accelerate
    ("accelerate:ParallelismConfig._validate_accelerator", {"accelerator"},
     "training/tensor_parallel.py: tensor parallel on CPU processes"),
    ("accelerate.state:PartialState._shared_state", set(), "training/distributed.py: FSDP on gloo"),
    # torch
    ("torch.cpu:_is_avx512_bf16_supported", set(), "training/hardware.py: bf16 on a CPU that has it"),
]


@pytest.mark.parametrize("path, parameters, where", PRIVATE_NAMES, ids=[name for name, _, _ in PRIVATE_NAMES])
def test_private_upstream_name_exists_with_the_parameters_hfllm_uses(path, parameters, where):
    try:
        found = _resolve(path)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"{path} is gone upstream ({error}); hfllm uses it in {where}")
    if parameters:
        missing = parameters - set(inspect.signature(found).parameters)
        assert not missing, f"{path} no longer takes {sorted(missing)}; hfllm uses it in {where}"


def test_compile_config_still_has_the_all_devices_switch():
    """inference/options.py sets CompileConfig._compile_all_devices so that generate() compiles on a CPU too."""
    from transformers import CompileConfig

    assert "_compile_all_devices" in vars(CompileConfig()) or hasattr(CompileConfig, "_compile_all_devices")


def test_dynamic_cache_builds_state_layers_for_linear_attention_layer_types():
    """modeling_hfllm.py stores "mamba" layers as "linear_attention" so that generate()'s DynamicCache(config=...)
    gives them conv / recurrent state layers (transformers' own hybrids, e.g. Bamba, do the same)."""
    from transformers import BambaConfig
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, LinearAttentionLayer

    assert DYNAMIC_LAYER_TYPE_MAPPING["linear_attention"] is LinearAttentionLayer
    assert "linear_attention" in BambaConfig(attn_layer_indices=[1], num_hidden_layers=2).layer_types


def test_attention_implementation_is_read_from_the_config():
    """modeling_hfllm.py and training/tensor_parallel.py read config._attn_implementation."""
    from transformers import LlamaConfig

    assert LlamaConfig(attn_implementation="sdpa")._attn_implementation == "sdpa"


def test_datasets_fingerprint_is_an_attribute_of_a_dataset():
    """data/packing.py keys its token cache on Dataset._fingerprint."""
    from datasets import Dataset

    assert isinstance(Dataset.from_dict({"text": ["a"]})._fingerprint, str)


def test_tied_weights_keys_is_a_mapping_on_transformers_models():
    """models/convert.py reads _tied_weights_keys (target -> source) to copy tied weights once."""
    from transformers import LlamaForCausalLM

    assert dict(LlamaForCausalLM._tied_weights_keys) == {"lm_head.weight": "model.embed_tokens.weight"}


def test_llama_cpp_model_handle_gives_token_text():
    """inference/llama_cpp_engine.py and shipping/verify.py read Llama._model (token text, end-of-generation ids)."""
    from hfllm.assets import llama_cpp
    from hfllm.errors import HfllmError

    try:
        module = llama_cpp(build=False)
    except HfllmError as error:
        pytest.skip(f"llama.cpp is not available without building it: {error}")
    assert "self._model = " in inspect.getsource(module.Llama.__init__)
    assert hasattr(module, "llama_vocab_is_eog") and hasattr(module._internals.LlamaModel, "token_get_text")
