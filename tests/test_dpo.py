"""DPO with LoRA (no reference copy) and full, on a tiny random Llama."""

import json

import pytest
from helpers import adaptation_recipe

from hfllm.errors import HfllmError
from hfllm.run_dpo import main as dpo_main


DPO = dict(test_split_size=0.25, eval_strategy="steps", eval_steps=100, max_steps=3, max_length=128)


def dpo_recipe(tmp_path, model_dir, synth_dir, **overrides):
    return adaptation_recipe(tmp_path, model_dir, synth_dir / "preference.jsonl", **(DPO | overrides))


def test_dpo_lora_reports_preference_metrics(tmp_path, tiny_llama_chat_dir, synth_dir):
    assert dpo_main([str(dpo_recipe(tmp_path, tiny_llama_chat_dir, synth_dir))]) == 0
    out = tmp_path / "out"
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    metrics = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= metrics["eval_rewards/accuracies"] <= 1.0 and "eval_rewards/margins" in metrics


def test_dpo_evaluates_once_when_the_last_step_already_did(tmp_path, tiny_llama_chat_dir, synth_dir, monkeypatch):
    """eval_steps = max_steps evaluates at the last step; the run reuses those metrics instead of a second pass."""
    from trl import DPOTrainer

    calls = []
    evaluate = DPOTrainer.evaluate
    monkeypatch.setattr(DPOTrainer, "evaluate", lambda self, *a, **k: calls.append(1) or evaluate(self, *a, **k))
    assert dpo_main([str(dpo_recipe(tmp_path, tiny_llama_chat_dir, synth_dir, max_steps=2, eval_steps=2))]) == 0
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert len(calls) == 1 and "eval_rewards/accuracies" in metrics and "step" not in metrics


def test_dpo_lora_trains_hfllm_models(tmp_path, tiny_hfllm_chat_dir, synth_dir):
    assert dpo_main([str(dpo_recipe(tmp_path, tiny_hfllm_chat_dir, synth_dir, max_steps=2))]) == 0
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert metrics["eval_loss"] > 0 and "eval_rewards/margins" in metrics


def test_dpo_with_lora_uses_no_reference_copy(tiny_llama_chat_dir, synth_dir, tmp_path):
    from trl import DPOConfig, DPOTrainer

    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

    from hfllm.checkpoint import load, load_tokenizer
    from hfllm.data.alignment import load_splits
    from hfllm.data.chat_template import set_template
    from hfllm.recipe import load_recipe
    from hfllm.training.adapters import build_peft_config
    from hfllm.training.align import HfllmArguments

    types = (ScriptArguments, DPOConfig, ModelConfig, DatasetMixtureConfig, HfllmArguments)
    recipe = load_recipe([str(dpo_recipe(tmp_path, tiny_llama_chat_dir, synth_dir))], types, "hfllm dpo")
    script, training, model_args, mixture, extra = recipe.args
    train, evaluation = load_splits("dpo", script, mixture, True)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    set_template(tokenizer, "smollm2", assistant_only_loss=False)
    model, _ = load(model_args.model_name_or_path, with_tokenizer=False)
    trainer = DPOTrainer(model=model, args=training, train_dataset=train, eval_dataset=evaluation,
                         processing_class=tokenizer, peft_config=build_peft_config(model_args, "lora", 0, model))
    assert trainer.ref_model is None  # the reference is the base with the adapter disabled


def test_dpo_full_fine_tune_saves_a_full_model(tmp_path, tiny_llama_chat_dir, synth_dir):
    recipe = dpo_recipe(tmp_path, tiny_llama_chat_dir, synth_dir, use_peft=False, eval_strategy="no", max_steps=2)
    assert dpo_main([str(recipe)]) == 0
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()


def test_dpo_needs_preference_columns(tmp_path, tiny_llama_chat_dir, synth_dir):
    recipe = dpo_recipe(tmp_path, tiny_llama_chat_dir, synth_dir, datasets=[{"path": str(synth_dir / "sft.jsonl")}])
    with pytest.raises(HfllmError, match=r"has columns \['messages'\] but dpo needs prompt\+chosen\+rejected"):
        dpo_main([str(recipe)])
    assert not (tmp_path / "out").exists()
