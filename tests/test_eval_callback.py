"""Evaluation during training from recipes: `eval_tasks:` and `regression_prompts:` drive EvalCallback every
eval_steps and at the last step, for pretraining and the TRL methods; the scores land in the log history, the
trackers, eval_results.json and the model card."""

import json

import pytest
from helpers import TINY, adaptation_recipe, data_args, log_history, write_recipe

from hfllm.errors import HfllmError
from hfllm.run_pretrain import main as pretrain_main
from hfllm.run_sft import main as sft_main

pytestmark = pytest.mark.usefixtures("single_thread")

# one prompt whose pattern any text matches, one that no text matches: pass rate exactly 1/2
PROMPTS = [{"prompt": "To be", "pattern": ".?"}, {"prompt": "Hello", "pattern": "^NEVER MATCHES$"}]


def scored(history: list[dict], key: str) -> dict[int, float]:
    return {entry["step"]: entry[key] for entry in history if key in entry}


def test_pretraining_recipe_scores_prompts_every_eval_steps_and_at_the_end(tmp_path):
    """max_steps 5, eval_steps 2: steps 2, 4 and the last step 5; in the log history, in tensorboard under eval/tasks/
    (next to eval/loss), and in eval_results.json (the final report). (lm-eval tasks: the SFT test below; both
    commands build the callback with the same `tracking.eval_callback`.)"""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = write_recipe(tmp_path / "r.yaml", {"model": "llama-tiny", "regression_prompts": PROMPTS})
    out = tmp_path / "out"
    assert pretrain_main([str(recipe), *TINY, *data_args(tmp_path), "--output_dir", str(out), "--max_steps", "5",
                          "--eval_steps", "2", "--logging_steps", "1", "--report_to", "tensorboard",
                          "--num_samples", "0"]) == 0
    history = log_history(out)
    assert scored(history, "eval_tasks/regression_prompts/pass_rate") == {2: 0.5, 4: 0.5, 5: 0.5}
    assert all("tokens_per_second" in entry for entry in history if "loss" in entry and entry["step"] > 1)

    [events_dir] = (out / "runs").iterdir()  # TensorBoardCallback's folder: output_dir/runs/<date_host>
    events = EventAccumulator(str(events_dir)).Reload()
    assert [e.step for e in events.Scalars("eval/tasks/regression_prompts/pass_rate")] == [2, 4, 5]
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4, 5]  # the final evaluation at 5

    report = json.loads((out / "eval_results.json").read_text())
    assert report["eval_tasks/regression_prompts/pass_rate"] == 0.5 and report["eval_tasks/step"] == 5


def test_sft_recipe_scores_reach_eval_results_and_the_model_card(tmp_path, tiny_llama_chat_dir, synth_dir):
    """SFT (TRL) with an lm-eval task: scored at the last step (one evaluation: every eval_steps is the pretraining
    test's, the same callback), TRL's own training logs kept at every step; eval_results.json keeps TRL's final eval
    loss and adds the scores; `hfllm push`'s card lists them in the model-index and the evaluation section."""
    from hfllm.shipping.card import build_card
    from hfllm.shipping.push import run_facts

    recipe = adaptation_recipe(tmp_path, tiny_llama_chat_dir, synth_dir / "sft.jsonl", max_steps=3, logging_steps=1,
                               max_length=128, assistant_only_loss=True, eval_steps=3, eval_tasks=["hfllm_synth"],
                               eval_tasks_limit=2, regression_prompts=PROMPTS, eval_strategy="steps",
                               test_split_size=0.25)
    assert sft_main([str(recipe)]) == 0
    out = tmp_path / "out"
    history = log_history(out)
    assert scored(history, "eval_tasks/regression_prompts/pass_rate") == {3: 0.5}
    assert list(scored(history, "eval_tasks/hfllm_synth/exact_match")) == [3]
    assert [e["step"] for e in history if "mean_token_accuracy" in e] == [1, 2, 3]  # TRL's own metrics untouched

    report = json.loads((out / "eval_results.json").read_text())
    assert "eval_loss" in report and report["eval_tasks/regression_prompts/pass_rate"] == 0.5

    card = str(build_card(run_facts(out, "tiny-sft"), "me/tiny-sft", "apache-2.0"))
    assert "name: hfllm_synth" in card and "name: regression_prompts" in card  # model-index entries
    assert "Scores during training (step 3;" in card and "| regression_prompts | pass_rate | 0.5 |" in card


@pytest.mark.parametrize("keys, message", [
    ({"eval_tasks": ["hfllm_synht"]}, r"^unknown task 'hfllm_synht'; did you mean hfllm_synth"),
    ({"regression_prompts": [{"prompt": "a"}]}, r"^regression_prompts entry 1 is .*; give each as"),
    ({"regression_prompts": [{"prompt": "a", "pattern": "("}]}, r"^regression_prompts entry 1: pattern '\(' is not"),
])
def test_bad_eval_keys_fail_before_training(tmp_path, keys, message):
    recipe = write_recipe(tmp_path / "r.yaml", {"model": "llama-tiny", **keys})
    with pytest.raises(HfllmError, match=message):
        pretrain_main([str(recipe), *TINY, *data_args(tmp_path), "--output_dir", str(tmp_path / "out"),
                       "--max_steps", "2"])
    assert not (tmp_path / "out" / "model.safetensors").exists()
