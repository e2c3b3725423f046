"""ORPO, KTO and GRPO (programmatic exact-match reward) on a tiny random Llama."""

import importlib
import json
from pathlib import Path

import pytest
from helpers import adaptation_recipe

from hfllm.errors import HfllmError
from hfllm.training.align import TRAINERS, grpo_main, kto_main, orpo_main


def recipe(tmp_path, model_dir, data_file, **overrides) -> str:
    return str(adaptation_recipe(tmp_path, model_dir, data_file, **({"max_steps": 2} | overrides)))


def test_orpo(tmp_path, tiny_llama_chat_dir, synth_dir):
    assert orpo_main([recipe(tmp_path, tiny_llama_chat_dir, synth_dir / "preference.jsonl", max_length=128)]) == 0
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_kto(tmp_path, tiny_llama_chat_dir, synth_dir):
    assert kto_main([recipe(tmp_path, tiny_llama_chat_dir, synth_dir / "kto.jsonl", max_length=128)]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_grpo_with_exact_match_reward(tmp_path, tiny_llama_chat_dir, synth_dir):
    path = recipe(tmp_path, tiny_llama_chat_dir, synth_dir / "prompts.jsonl", num_generations=4, max_completion_length=4,
                  logging_steps=1)
    assert grpo_main([path]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_grpo_unknown_reward_function(tmp_path, tiny_llama_chat_dir, synth_dir):
    path = recipe(tmp_path, tiny_llama_chat_dir, synth_dir / "prompts.jsonl", reward_funcs=["hfllm.evaluation.exact_match:nope"], num_generations=4)
    with pytest.raises(HfllmError, match="reward function 'hfllm.evaluation.exact_match:nope' not found; give it as module:function"):
        grpo_main([path])


def test_kto_needs_label_column(tmp_path, tiny_llama_chat_dir, synth_dir):
    with pytest.raises(HfllmError, match=r"kto needs prompt\+completion\+label"):
        kto_main([recipe(tmp_path, tiny_llama_chat_dir, synth_dir / "preference.jsonl")])


ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for method in TRAINERS for p in (ROOT / "recipes" / method).glob("*.yaml"))


def test_shipped_recipes_are_found_from_any_directory():
    assert len(SHIPPED) >= 5 and {p.parent.name for p in SHIPPED} == set(TRAINERS)  # a recipe for every method


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_recipes_parse(path):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

    from hfllm.recipe import load_recipe
    from hfllm.training.align import GRPOArguments, HfllmArguments

    method = path.parent.name
    module, config_name, _ = TRAINERS[method]
    config = getattr(importlib.import_module(module), config_name)
    extra = (GRPOArguments,) if method == "grpo" else ()
    types = (ScriptArguments, config, ModelConfig, DatasetMixtureConfig, HfllmArguments, *extra)
    args = load_recipe([str(path), "--bf16", "false"], types, f"hfllm {method}").args  # bf16 needs a GPU here
    assert args[2].model_name_or_path and args[1].output_dir.startswith("runs/") and args[3].datasets
