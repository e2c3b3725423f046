"""ORPO, KTO and GRPO on a tiny random Llama: each method's own metrics move the right way in a few steps."""

from pathlib import Path

import pytest
from helpers import adaptation_recipe, checkpoint_series, first_rows

from hfllm.errors import HfllmError
from hfllm.training.align import TRAINERS, grpo_main, kto_main, orpo_main, parse_recipe

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread is fastest


def recipe(tmp_path, model_dir, data_file, **overrides) -> str:
    return str(adaptation_recipe(tmp_path, model_dir, data_file, **({"max_steps": 2} | overrides)))


def four_row_recipe(tmp_path, model_dir, data_file, steps: int, **overrides) -> str:
    """A run on the first 4 rows with a batch of 4 (every step sees the same rows), logging every step, saving a
    checkpoint (with trainer_state.json) at the end."""
    data = first_rows(data_file, 4, tmp_path / data_file.name)
    return recipe(tmp_path, model_dir, data, max_steps=steps, logging_steps=1, save_strategy="steps", save_steps=steps,
                  max_length=128, **overrides)


def rises(values: list[float]) -> bool:
    return len(values) > 2 and all(b > a for a, b in zip(values, values[1:]))


def falls(values: list[float]) -> bool:
    return rises([-v for v in values])


def test_orpo_raises_the_log_odds_of_the_chosen_answer(tmp_path, tiny_llama_chat_dir, synth_dir):
    assert orpo_main([four_row_recipe(tmp_path, tiny_llama_chat_dir, synth_dir / "preference.jsonl", 4, beta=1.0)]) == 0
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file()
    nll, log_odds = checkpoint_series(out, "nll_loss"), checkpoint_series(out, "log_odds_chosen")
    # measured: nll 6.02 -> 5.81; log odds of chosen over rejected -0.061 -> 0.031
    assert falls(nll), nll
    assert rises(log_odds) and log_odds[-1] > log_odds[0] + 0.05 and log_odds[-1] > 0, log_odds


def test_kto_widens_the_reward_margin_of_desirable_answers(tmp_path, tiny_llama_chat_dir, synth_dir):
    assert kto_main([four_row_recipe(tmp_path, tiny_llama_chat_dir, synth_dir / "kto.jsonl", 4)]) == 0
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file()
    loss, margins = checkpoint_series(out, "loss"), checkpoint_series(out, "rewards/margins")
    # measured: loss 0.5 -> 0.485; margin 0 -> 0.118 (desirable up, undesirable down)
    assert falls(loss), loss
    assert margins[0] == 0 and rises(margins) and margins[-1] > 0.05, margins
    assert checkpoint_series(out, "rewards/chosen")[-1] > 0 > checkpoint_series(out, "rewards/rejected")[-1]


def digit_share(completions, **kwargs) -> list[float]:
    """A GRPO reward a random tiny model can learn in a few steps: the share of digits in the completion."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # conversational or plain
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in texts]


def test_grpo_raises_the_reward(tmp_path, tiny_llama_chat_dir, synth_dir):
    """Full fine-tuning at a high learning rate, 8 sampled completions of 8 tokens for each of 2 prompts a step; the
    reward function is named module:function like any recipe's."""
    path = recipe(tmp_path, tiny_llama_chat_dir, first_rows(synth_dir / "prompts.jsonl", 4, tmp_path / "prompts.jsonl"),
                  reward_funcs=["test_align:digit_share"], use_peft=False, learning_rate=2e-2, max_steps=12,
                  num_generations=8, per_device_train_batch_size=16, max_completion_length=8, logging_steps=1,
                  save_strategy="steps", save_steps=12)
    assert grpo_main([path]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    reward = checkpoint_series(tmp_path / "out", "reward")
    assert reward == checkpoint_series(tmp_path / "out", "rewards/digit_share/mean")  # the one reward function
    # measured: 0.16 0.15 0.19 ... 0.49 0.60 (sampling makes single steps noisy; the ends are far apart)
    first, last = sum(reward[:3]) / 3, sum(reward[-3:]) / 3
    assert len(reward) == 12 and last > first + 0.15, reward


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
    method = path.parent.name
    args = parse_recipe(method, [str(path), "--bf16", "false"], f"hfllm {method}").args  # bf16 needs a GPU here
    assert args[2].model_name_or_path and args[1].output_dir.startswith("runs/") and args[3].datasets
