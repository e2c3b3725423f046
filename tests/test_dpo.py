"""DPO with LoRA (no reference copy) and full, on a tiny random Llama: the preference is learned."""

import json
import math

import pytest
import torch
from helpers import adaptation_recipe, checkpoint_series, first_rows, series
from transformers import TrainerCallback

from hfllm.errors import HfllmError
from hfllm.run_dpo import main as dpo_main

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread is fastest


DPO = dict(test_split_size=0.25, eval_strategy="steps", eval_steps=100, max_steps=3, max_length=128)
LEARNS = dict(max_steps=6, logging_steps=1, per_device_train_batch_size=8)  # enough steps to see the preference


def dpo_recipe(tmp_path, model_dir, synth_dir, **overrides):
    return adaptation_recipe(tmp_path, model_dir, synth_dir / "preference.jsonl", **(DPO | overrides))


def learned_the_preference(output_dir) -> bool:
    """The training pairs lean to the chosen answer over the last 3 logged steps (mean margin > 0, mean accuracy
    > 0.5). Held-out pairs are not asserted: 8 pairs on a tiny random model after a few steps go either way with the
    seed (measured over seeds 0-3: accuracy 0.25-0.5), while these held for every seed."""
    margins, accuracies = series(output_dir, "rewards/margins")[-3:], series(output_dir, "rewards/accuracies")[-3:]
    return len(margins) == 3 and sum(margins) > 0 and sum(accuracies) / 3 > 0.5


def test_dpo_lora_reports_preference_metrics(tmp_path, tiny_llama_chat_dir, synth_dir):
    assert dpo_main([str(dpo_recipe(tmp_path, tiny_llama_chat_dir, synth_dir, **LEARNS))]) == 0
    out = tmp_path / "out"
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    metrics = json.loads((out / "eval_results.json").read_text())
    # the held-out preference metrics are reported (an untrained adapter scores exactly ln 2, margin 0, accuracy 0)
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] != pytest.approx(math.log(2), abs=1e-6)
    assert {"eval_rewards/margins", "eval_rewards/accuracies"} <= set(metrics)
    assert learned_the_preference(out), series(out, "rewards/margins")


class EvaluationCounter(TrainerCallback):
    def __init__(self):
        self.evaluations = 0

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluations += 1


def test_dpo_evaluates_once_when_the_last_step_already_did(tmp_path, tiny_llama_chat_dir, synth_dir):
    """eval_steps = max_steps evaluates at the last step; the run reuses those metrics instead of a second pass."""
    counter = EvaluationCounter()
    recipe = dpo_recipe(tmp_path, tiny_llama_chat_dir, synth_dir, max_steps=2, eval_steps=2)
    assert dpo_main([str(recipe)], callbacks=[counter]) == 0
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert counter.evaluations == 1 and "eval_rewards/accuracies" in metrics and "step" not in metrics


def test_dpo_lora_trains_hfllm_models(tmp_path, tiny_hfllm_chat_dir, synth_dir):
    assert dpo_main([str(dpo_recipe(tmp_path, tiny_hfllm_chat_dir, synth_dir, **LEARNS))]) == 0
    assert learned_the_preference(tmp_path / "out"), series(tmp_path / "out", "rewards/margins")


def test_dpo_with_lora_uses_no_reference_copy(tiny_llama_chat_dir, synth_dir, tmp_path):
    from hfllm.training.align import build, parse_recipe

    recipe = parse_recipe("dpo", [str(dpo_recipe(tmp_path, tiny_llama_chat_dir, synth_dir))], "hfllm dpo")
    trainer = build("dpo", recipe).trainer  # what `hfllm dpo` trains
    assert trainer.ref_model is None  # the reference is the base with the adapter disabled
    assert not any((tmp_path / "out").iterdir())  # nothing written yet (Trainer makes the empty folder)


def test_dpo_full_fine_tune_learns_the_preference_and_saves_a_full_model(tmp_path, tiny_llama_chat_dir, synth_dir):
    """4 pairs, a batch of 4: every step sees the same pairs; the reference is a frozen copy of the start."""
    from transformers import AutoModelForCausalLM

    data = first_rows(synth_dir / "preference.jsonl", 4, tmp_path / "preference.jsonl")
    recipe = dpo_recipe(tmp_path, tiny_llama_chat_dir, synth_dir, use_peft=False, datasets=[{"path": str(data)}],
                        eval_strategy="no", test_split_size=None, max_steps=4, logging_steps=1, save_strategy="steps",
                        save_steps=4)
    assert dpo_main([str(recipe)]) == 0
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    loss, margins = checkpoint_series(out, "loss"), checkpoint_series(out, "rewards/margins")
    # measured: loss 0.6931 0.6192 0.5609 0.5036; margin 0 0.156 0.288 0.430
    assert loss[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the first step
    assert all(b < a for a, b in zip(loss, loss[1:])) and loss[-1] < 0.6, loss
    assert all(b > a for a, b in zip(margins, margins[1:])) and margins[-1] > 0.2, margins
    assert checkpoint_series(out, "rewards/accuracies")[-1] == 1.0
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_llama_chat_dir).state_dict()
    assert not torch.equal(saved["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"])


def test_dpo_needs_preference_columns(tmp_path, tiny_llama_chat_dir, synth_dir):
    recipe = dpo_recipe(tmp_path, tiny_llama_chat_dir, synth_dir, datasets=[{"path": str(synth_dir / "sft.jsonl")}])
    with pytest.raises(HfllmError, match=r"has columns \['messages'\] but dpo needs prompt\+chosen\+rejected"):
        dpo_main([str(recipe)])
    assert not (tmp_path / "out").exists()
